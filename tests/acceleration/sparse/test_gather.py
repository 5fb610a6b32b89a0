"""Gathered windows with halo + VALID convolution + scatter == the dense convolution on the active tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffjax.acceleration.sparse import level_masks, make_plan
from diffjax.acceleration.sparse.gather import conv_windows, gather, scatter, tile_pixels

DN = ("NHWC", "HWIO", "NHWC")


def _dense(x, w, stride=1, upsample=1):
  if upsample > 1:
    x = jnp.repeat(jnp.repeat(x, upsample, axis=1), upsample, axis=2)
  return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DN)


def _plan(seed, hw=16):
  rng = np.random.default_rng(seed)
  mask = np.zeros((2, hw, hw), bool)
  mask[0, rng.integers(0, hw, 2), rng.integers(0, hw, 2)] = True
  mask[0, 0, hw - 1] = mask[1, hw - 1, 0] = True  # corners: halos leave the image
  return mask, make_plan(mask, block_sizes=(4, 2), dilation=1, bucket_growth=1.5)


@pytest.mark.parametrize(
  "geometry",
  [
    dict(level_out=0, stride=1, upsample=1),  # 3x3 conv at level 0
    dict(level_out=1, stride=2, upsample=1),  # strided downsampler, level 0 -> 1
    dict(level_out=0, stride=1, upsample=2),  # nearest x2 + conv, level 1 -> 0
  ],
)
def test_sparse_conv_equals_dense_conv_on_the_tiles(geometry):
  _, plan = _plan(0)
  lo, s, up = geometry["level_out"], geometry["stride"], geometry["upsample"]
  hl, wl = plan.level_shape(lo)
  src_hw = (hl * s // up, wl * s // up)
  x = jax.random.normal(jax.random.key(1), (2, *src_hw, 5))
  w = jax.random.normal(jax.random.key(2), (3, 3, 5, 7))
  dense = _dense(x, w, stride=s, upsample=up)
  assert dense.shape[1:3] == (hl, wl)
  b = plan.block_sizes[lo]
  assert plan.block_sizes[lo] is not None and not bool(plan.valid[lo].all())

  @jax.jit
  def sparse(x, w, tiles, valid_tiles):
    idx, valid, win = conv_windows(tiles, block=b, conv_hw=(hl * s, wl * s), stride=s, upsample=up)
    stack = lax.conv_general_dilated(gather(x, idx, win) * valid, w, (s, s), "VALID", dimension_numbers=DN)
    return scatter(jnp.full(dense.shape, 7.0), stack, tile_pixels(tiles, valid_tiles, block=b, hw=(hl, wl)))

  out = sparse(x, w, plan.tiles[lo], plan.valid[lo])
  tm = np.asarray(plan.tile_mask(lo))[..., None]
  np.testing.assert_allclose(np.where(tm, out, 0), np.where(tm, dense, 0), atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(np.where(tm, 7.0, out), 7.0)  # padded and inactive tiles untouched


def test_level_masks_cover_every_changed_output_of_the_entry_convs():
  """A change inside the input mask moves conv_in's outputs only inside level 0's tiles, and a change
  inside level l's mask moves the downsampler's outputs only inside level l+1's tiles."""
  mask, plan = _plan(3)
  w = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 4))
  x2 = x + jnp.asarray(mask)[..., None] * jax.random.normal(jax.random.key(5), x.shape)
  changed = np.abs(np.asarray(_dense(x2, w) - _dense(x, w))).max(-1) > 0
  assert changed.any() and not (changed & ~np.asarray(plan.tile_mask(0))).any()
  m0 = level_masks(mask, num_levels=2, dilation=1)[0]
  x3 = x + jnp.asarray(m0)[..., None] * jax.random.normal(jax.random.key(6), x.shape)
  changed = np.abs(np.asarray(_dense(x3, w, stride=2) - _dense(x, w, stride=2))).max(-1) > 0
  assert changed.any() and not (changed & ~np.asarray(plan.tile_mask(1))).any()
