"""The U-Net's sparse twin: recording equals the model, the sparse replay equals its dense reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.acceleration.sparse import (
  make_plan,
  unet_macs,
  unet_masked_reference,
  unet_record,
  unet_sparse,
)
from diffjax.models import UNet
from tests.acceleration.sparse.helpers import random_params

UNET = UNet(
  in_channels=2,
  out_channels=2,
  block_out_channels=(8, 16, 16),
  layers_per_block=1,
  attention_levels=(False, True, True),
  attention_head_dim=8,
  norm_num_groups=4,
  num_classes=3,
  attention_impl="xla",  # compiles faster than the blocked CPU kernel; the same function
)
BLOCKS = (4, 2, None)  # level 1 (with attention) sparse in 2x2 tiles, level 2 dense
B, H = 2, 16


@functools.partial(jax.jit, static_argnames="reference")
def _replay(params, x, t, label, cache, plan, reference=False):
  fn = unet_masked_reference if reference else unet_sparse
  return fn(UNET, params, x, t, label, cache=cache, plan=plan)


@jax.jit
def _dense(params, x, t, label):
  return UNET.apply({"params": params}, x, t, label)


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(0), (B, H, H, 2))
  t, label = jnp.array([3, 700]), jnp.array([0, 3])
  params = random_params(UNET, x, t, label)
  out, cache = jax.jit(lambda p, x, t, y: unet_record(UNET, p, x, t, y))(params, x, t, label)
  return params, x, t, label, out, cache


# One box per example away from the borders on example 0, at a corner on example 1: every edit below with
# boxes of these sizes shifted by whole level-0 tiles has the same bucket sizes (no recompiles).
BOXES = [(0, 5, 6, 5, 6), (1, 15, 16, 3, 5)]


def _edit(x, seed, boxes):
  mask = np.zeros(x.shape[:3], bool)
  for b, y0, y1, x0, x1 in boxes:
    mask[b, y0:y1, x0:x1] = True
  noise = jax.random.normal(jax.random.key(seed), x.shape)
  return x + jnp.asarray(mask)[..., None] * noise, mask


def test_record_is_the_dense_model(setup):
  params, x, t, label, out, cache = setup
  np.testing.assert_allclose(out, _dense(params, x, t, label), atol=1e-5)
  assert cache["down_blocks_0/resnets_0"].shape == (B, H, H, 8)
  assert cache["up_blocks_0/attentions_1/to_k"].shape == (B, 4, 4, 16)
  assert cache["mid_block/resnets_0/norm1:scale"].shape == (B, 16)


def test_sparse_equals_the_masked_dense_reference(setup):
  """The CI check of the sparse path against dense computation (float32, <= 1e-4): halos at image
  borders, strided and upsampling windows, sparse attention, batch, bucket padding."""
  params, x, t, label, out, cache = setup
  x2, mask = _edit(x, 2, BOXES)
  plan = make_plan(mask, block_sizes=BLOCKS)
  assert not bool(plan.valid[0].all()) and not bool(plan.valid[1].all())  # bucket padding present
  sparse = _replay(params, x2, t, label, cache, plan)
  ref = _replay(params, x2, t, label, cache, plan, reference=True)
  assert float(jnp.max(jnp.abs(sparse - ref))) <= 1e-4
  np.testing.assert_allclose(sparse, ref, atol=1e-5, rtol=0)
  tiles = np.asarray(plan.tile_mask(0))[..., None]
  np.testing.assert_array_equal(np.where(tiles, 0, sparse), np.where(tiles, 0, out))  # cached outside
  assert float(np.abs(np.where(tiles, sparse - out, 0)).max()) > 0.05  # recomputed inside
  dense = _dense(params, x2, t, label)
  assert float(np.abs(np.where(tiles, sparse - dense, 0)).max()) < float(np.abs(np.where(tiles, out - dense, 0)).max())


def test_unedited_input_reproduces_the_dense_output(setup):
  params, x, t, label, out, cache = setup
  _, mask = _edit(x, 3, BOXES)
  plan = make_plan(mask, block_sizes=BLOCKS)
  np.testing.assert_allclose(_replay(params, x, t, label, cache, plan), out, atol=1e-5)


def test_new_masks_within_a_bucket_do_not_recompile(setup):
  params, x, t, label, _, cache = setup
  _, mask = _edit(x, 4, BOXES)
  _replay(params, x, t, label, cache, make_plan(mask, block_sizes=BLOCKS))
  compiled = _replay._cache_size()
  for dy, dx in ((4, 0), (4, 4), (0, 4)):  # whole tiles at levels 0 and 1, away from the borders
    boxes = [(0, y0 + dy, y1 + dy, x0 + dx, x1 + dx) for _, y0, y1, x0, x1 in BOXES[:1]] + BOXES[1:]
    x2, mask = _edit(x, 5, boxes)
    _replay(params, x2, t, label, cache, make_plan(mask, block_sizes=BLOCKS))
  assert _replay._cache_size() == compiled


def test_macs_are_counted_per_layer_and_scale_with_the_tiles(setup):
  params = setup[0]
  triples = unet_macs(UNET, params, (B, H, H, 2), label=jnp.zeros(B, jnp.int32))
  dense = {name: m for name, _, m in triples}
  levels = {name: level for name, level, _ in triples}
  assert levels["conv_in"] == 0 and levels["mid_block/attentions_0/attention"] == 2
  assert levels["up_blocks_0/upsamplers_0/conv"] == 1 and levels["time_embedding"] is None
  assert dense["conv_in"] == B * H * H * 9 * 2 * 8
  assert dense["down_blocks_0/downsamplers_0/conv"] == B * 8 * 8 * 9 * 8 * 8
  assert dense["up_blocks_0/upsamplers_0/conv"] == B * 8 * 8 * 9 * 16 * 16  # level 2 -> 1
  assert dense["down_blocks_1/attentions_0/attention"] == 2 * B * 64 * 64 * 16
  _, mask = _edit(setup[1], 5, [(0, 0, 2, 0, 2)])
  plan = make_plan(mask, block_sizes=BLOCKS)
  sparse = {n: m for n, _, m in unet_macs(UNET, params, (B, H, H, 2), plan=plan, label=jnp.zeros(B, jnp.int32))}
  n0, n1 = plan.tiles[0].shape[1], plan.tiles[1].shape[1]
  assert sparse["conv_in"] == dense["conv_in"] * n0 * 16 // (H * H)
  assert sparse["down_blocks_1/attentions_0/attention"] == dense["down_blocks_1/attentions_0/attention"] * n1 * 4 // 64
  assert sparse["mid_block/resnets_0/conv1"] == dense["mid_block/resnets_0/conv1"]  # dense level
  assert sum(sparse.values()) < sum(dense.values()) / 2


def test_bad_arguments(setup):
  params, x, t, label, _, cache = setup
  _, mask = _edit(x, 6, [(0, 0, 2, 0, 2)])
  with pytest.raises(ValueError, match=r"plan was made for inputs of shape \[B, H, W\]=\[2, 16, 16\]"):
    unet_sparse(UNET, params, x[:1], t[:1], label[:1], cache=cache, plan=make_plan(mask, block_sizes=BLOCKS))
  with pytest.raises(ValueError, match="plan has 2 levels but the U-Net has 3"):
    unet_sparse(UNET, params, x, t, label, cache=cache, plan=make_plan(mask, block_sizes=(4, 2)))
  with pytest.raises(ValueError, match="does not support guidance_embedding"):
    unet_record(UNET.clone(guidance_embedding=True), params, x, t, label)
  with pytest.raises(ValueError, match="unet must be a diffjax.models.UNet"):
    unet_record(object(), params, x, t, label)
