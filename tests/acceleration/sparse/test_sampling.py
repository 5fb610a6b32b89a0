"""SDEdit and DDIM with a cache per step: recording equals the dense sampler, a sparse SDEdit equals its
dense reference, and outside the edit's tiles the result stays the original's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.acceleration.sparse import (
  SparseParams,
  difference_mask,
  make_plan,
  record_ddim,
  record_sdedit,
  sparse_model_fn,
)
from diffjax.editing import sdedit
from diffjax.models import UNet
from diffjax.samplers import ddim_sample
from diffjax.schedules import make_schedule
from tests.acceleration.sparse.helpers import random_params

# One level (its middle block's attention sparse in 2x2 tiles): the loops compile fast; the level
# crossings (strided and upsampling windows, dense levels) are tested in test_unet.
UNET = UNet(
  in_channels=1,
  out_channels=1,
  block_out_channels=(8,),
  layers_per_block=1,
  attention_levels=(False,),
  attention_head_dim=8,
  norm_num_groups=4,
  num_classes=3,
  attention_impl="xla",  # compiles faster than the blocked CPU kernel; the same function
)
BLOCKS = (2,)
SCHEDULE = make_schedule("linear", num_timesteps=50)
B, H = 2, 8
LABEL = jnp.array([0, 2])
KEY = jax.random.key(7)


def _dense_fn(p, x, t, y):
  return UNET.apply({"params": p}, x, t, y)


@pytest.fixture(scope="module")
def params():
  x = jnp.zeros((B, H, H, 1))
  return random_params(UNET, x, jnp.zeros(B, jnp.int32), LABEL)


def _box_edit(x, seed):
  mask = np.zeros((B, H, H), bool)
  mask[0, 0:2, 5:8] = True
  mask[1, 6:8, 0:1] = True
  new = jax.random.uniform(jax.random.key(seed), x.shape, minval=-1, maxval=1)
  return jnp.where(jnp.asarray(mask)[..., None], new, x)


def test_sdedit_with_a_cache_per_step(params):
  """Recording follows SDEdit (its steps are sdedit's own, each prediction the dense model's, see
  test_unet); the sparse edit equals its dense reference and keeps the original outside its tiles."""
  guide = jax.random.uniform(jax.random.key(0), (B, H, H, 1), minval=-1, maxval=1)
  keep = np.ones((B, H, H, 1), np.float32)
  keep[:, 3:5] = 0.0  # Algorithm 3's mask: rows 3-4 stay the guide
  kw = dict(schedule=SCHEDULE, key=KEY, strength=0.6, cond=LABEL, mask=jnp.asarray(keep), num_steps=5, clip_x0=None)
  x_orig, traj = jax.jit(lambda p, g: record_sdedit(unet=UNET, params=p, x_guide=g, **kw))(params, guide)
  np.testing.assert_array_equal(traj.timesteps, [29, 19, 9])

  edited = _box_edit(guide, 1)
  plan = make_plan(difference_mask(edited, guide), block_sizes=BLOCKS)

  @functools.partial(jax.jit, static_argnames="reference")
  def edit(bundle, g, reference):
    return sdedit(model_fn=sparse_model_fn(UNET, reference=reference), params=bundle, x_guide=g, **kw)

  bundle = SparseParams(params, traj, plan)
  sparse, ref = edit(bundle, edited, reference=False), edit(bundle, edited, reference=True)
  assert float(jnp.max(jnp.abs(sparse - ref))) <= 1e-4
  tiles = np.asarray(plan.tile_mask(0))[..., None]
  np.testing.assert_array_equal(np.where(tiles, 0, sparse), np.where(tiles, 0, x_orig))
  np.testing.assert_array_equal(sparse[:, 3:5], edited[:, 3:5])  # Algorithm 3 keeps the guide there
  assert float(jnp.abs(sparse - x_orig).max()) > 0.1


def test_ddim_regeneration_of_a_region(params):
  x_T = jax.random.normal(jax.random.key(3), (B, H, H, 1))
  kw = dict(schedule=SCHEDULE, key=KEY, cond=LABEL, spacing="uniform")
  x0, traj = jax.jit(lambda p, x: record_ddim(unet=UNET, params=p, x_T=x, num_steps=4, num_slots=4, **kw))(params, x_T)
  dense = jax.jit(lambda p, x: ddim_sample(model_fn=_dense_fn, params=p, x_T=x, num_steps=4, **kw))(params, x_T)
  np.testing.assert_allclose(x0, dense, atol=1e-5)
  x_T2 = _box_edit(x_T, 4)
  plan = make_plan(difference_mask(x_T2, x_T), block_sizes=BLOCKS)

  @jax.jit
  def regenerate(bundle, x_T, num_steps):
    return ddim_sample(model_fn=sparse_model_fn(UNET), params=bundle, x_T=x_T, num_steps=num_steps, **kw)

  bundle = SparseParams(params, traj, plan)
  out = regenerate(bundle, x_T2, 4)
  tiles = np.asarray(plan.tile_mask(0))[..., None]
  np.testing.assert_array_equal(np.where(tiles, 0, out), np.where(tiles, 0, x0))
  assert float(np.abs(np.where(tiles, out - x0, 0)).max()) > 0.1
  np.testing.assert_allclose(regenerate(bundle, x_T, 4), x0, atol=1e-5)  # the unedited noise: the original
  assert bool(jnp.isnan(regenerate(bundle, x_T2, 3)).all())  # timesteps without a cache


def test_num_slots_is_needed_for_traced_step_counts(params):
  x_T = jnp.zeros((B, H, H, 1))
  with pytest.raises(ValueError, match="num_slots must be given when num_steps is traced"):
    jax.jit(lambda n: record_ddim(unet=UNET, params=params, schedule=SCHEDULE, x_T=x_T, key=KEY, num_steps=n))(3)
