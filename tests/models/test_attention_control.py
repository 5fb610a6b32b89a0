"""Attention control and recording: identity is bitwise neutral, maps are recorded, controls take effect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.attention_control import (
  ATTENTION_MAPS,
  AttentionInfo,
  chain_controls,
  cross_attention_maps,
  token_maps,
)
from diffjax.models.transformer import Attention, attention_probs, masked_attention
from diffjax.models.unet_condition import UNetCondition
from tests.models.random_params import random_params

CROSS_LAYERS = [
  "down_blocks_0/attentions_0/transformer_blocks_0/attn2",
  "down_blocks_1/attentions_0/transformer_blocks_0/attn2",
  "mid_block/attentions_0/transformer_blocks_0/attn2",
  "up_blocks_0/attentions_0/transformer_blocks_0/attn2",
  "up_blocks_0/attentions_1/transformer_blocks_0/attn2",
  "up_blocks_1/attentions_0/transformer_blocks_0/attn2",
  "up_blocks_1/attentions_1/transformer_blocks_0/attn2",
]


@pytest.fixture(scope="module")
def tiny():
  unet = UNetCondition(
    in_channels=4, out_channels=4, block_out_channels=(16, 32), num_attention_heads=2, norm_num_groups=4
  )
  x = jax.random.normal(jax.random.key(0), (2, 8, 16, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  variables = {"params": random_params(unet, x, jnp.zeros(2), ctx, mask)}
  return unet, variables, (x, jnp.array([10, 700]), ctx, mask)


@pytest.fixture(scope="module")
def outputs(tiny):
  """One compiled program: a plain apply, an identity-controlled (spying) recording one, a boosting one."""
  unet, variables, args = tiny
  seen = []

  def spy(probs, info):
    seen.append((info, probs.shape))  # runs while tracing
    return probs

  @jax.jit
  def run(variables, scale, x, t, ctx, mask):
    def boost(probs, info):
      return probs.at[..., 1].multiply(scale) if info.is_cross else probs

    plain = unet.apply(variables, x, t, ctx, mask)
    spied, state = unet.apply(variables, x, t, ctx, mask, attention_control=spy, mutable=[ATTENTION_MAPS])
    boosted = unet.apply(variables, x, t, ctx, mask, attention_control=boost)
    return plain, spied, state, boosted

  cache = {}

  def results(scale):
    if scale not in cache:
      cache[scale] = run(variables, scale, *args)
    return cache[scale]

  return results, seen


def test_init_is_unchanged_and_records_nothing(tiny):
  unet, _, (x, t, ctx, mask) = tiny
  assert set(jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx, mask)) == {"params"}


def test_identity_control_and_recording_are_bitwise_neutral(outputs):
  plain, spied, _, _ = outputs[0](1.0)
  assert np.array_equal(np.asarray(plain), np.asarray(spied))


def test_control_sees_every_layer_and_the_recorded_maps(outputs):
  _, _, state, _ = outputs[0](1.0)
  seen = outputs[1]
  cross = [(i, s) for i, s in seen if i.is_cross]
  assert [i.layer for i, _ in cross] == CROSS_LAYERS
  assert [i.layer.replace("attn2", "attn1") for i, _ in cross] == [i.layer for i, _ in seen if not i.is_cross]
  for info, shape in seen:
    h, w = info.spatial_shape
    assert shape == (2, 2, h * w, 5 if info.is_cross else h * w)
  maps = cross_attention_maps(state[ATTENTION_MAPS])
  assert list(maps) == CROSS_LAYERS
  for (info, _), (name, m) in zip(cross, maps.items(), strict=True):
    assert m.shape == (2, 2, *info.spatial_shape, 5)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.max(m[0, ..., 3:])) == 0.0  # padded tokens get no attention
  assert {info.spatial_shape for info, _ in cross} == {(8, 16), (4, 8)}


def test_token_maps_average_heads_and_layers(outputs):
  _, _, state, _ = outputs[0](1.0)
  maps = cross_attention_maps(state[ATTENTION_MAPS])
  full = token_maps(state[ATTENTION_MAPS], size=(8, 16))
  assert full.shape == (2, 8, 16, 5)
  np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
  only = token_maps(state[ATTENTION_MAPS], size=(8, 16), layers=lambda n: n.startswith("down_blocks_0"))
  np.testing.assert_allclose(only, maps[CROSS_LAYERS[0]].mean(axis=1), rtol=1e-6)
  with pytest.raises(ValueError, match="selects none"):
    token_maps(state[ATTENTION_MAPS], size=(8, 16), layers=lambda n: False)
  coarse = [m.mean(axis=1) for m in maps.values() if m.shape[2:4] == (4, 8)]
  assert 0 < len(coarse) < len(maps)
  lowest = token_maps(state[ATTENTION_MAPS], size=(4, 8), lowest_resolution=True)
  np.testing.assert_allclose(lowest, sum(coarse) / len(coarse), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="mutable"):
    cross_attention_maps({})


def test_traced_control_changes_the_output_under_jit(outputs):
  plain, _, _, same = outputs[0](1.0)
  np.testing.assert_allclose(same, plain, atol=1e-5)  # another computation: equal up to rounding
  _, _, _, boosted = outputs[0](3.0)
  assert float(jnp.max(jnp.abs(boosted - plain))) > 1e-3


def test_attention_attends_with_the_controlled_probabilities():
  attn = Attention(heads=2, dim_head=4)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  ctx = jax.random.normal(jax.random.key(1), (1, 3, 5))
  params = attn.init(jax.random.key(2), x, ctx)["params"]
  forced = jax.nn.softmax(jax.random.normal(jax.random.key(3), (1, 2, 6, 3)), axis=-1)
  out = attn.apply({"params": params}, x, ctx, attention_control=lambda p, info: forced)
  v = (ctx @ params["to_v"]["kernel"]).reshape(1, 3, 2, 4)
  mixed = jnp.einsum("bhls,bshd->blhd", forced, v).reshape(1, 6, 8)
  ref = mixed @ params["to_out_0"]["kernel"] + params["to_out_0"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="shaped like its input"):
    attn.apply({"params": params}, x, ctx, attention_control=lambda p, info: p[..., :2])


def test_chain_controls_and_probs_helpers():
  double = lambda p, info: p * 2.0  # noqa: E731
  plus = lambda p, info: p + 1.0  # noqa: E731
  info = AttentionInfo("x/attn2", True, (1, 1))
  assert chain_controls(None, None) is None
  assert float(chain_controls(double, None, plus)(jnp.ones(()), info)) == 3.0
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 2, 4)) for i in range(3))
  probs = attention_probs(q, k, jnp.array([[1, 1, 0], [1, 1, 1]]))
  assert probs.shape == (2, 2, 3, 3) and float(probs[0, ..., 2].max()) == 0.0
  np.testing.assert_allclose(
    masked_attention(q, k, v), jnp.einsum("bhls,bshd->blhd", attention_probs(q, k), v), atol=1e-6
  )
