"""Gathered windows with halo + VALID convolution + scatter == the dense convolution on the active tiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.acceleration.sparse import level_masks, make_plan
from diffjax.acceleration.sparse.gather import conv_windows, gather_windows, scatter, tile_grid, tile_pixels

DN = ("NHWC", "HWIO", "NHWC")
# (level_out, stride, upsample): a 3x3 conv at level 0, the strided downsampler 0 -> 1, nearest x2 + conv 1 -> 0.
GEOMETRIES = ((0, 1, 1), (1, 2, 1), (0, 1, 2))


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


@functools.partial(jax.jit, static_argnames="plan_static")
def _sparse_and_dense(xs, w, plan, plan_static=None):
  outs = []
  for (lo, s, up), x in zip(GEOMETRIES, xs):
    hl, wl = plan.level_shape(lo)
    b = plan.block_sizes[lo]
    win = conv_windows(plan.tiles[lo], block=b, conv_hw=(hl * s, wl * s), stride=s, upsample=up)
    stack = lax.conv_general_dilated(gather_windows(win, full=x) * win.valid, w, (s, s), "VALID", dimension_numbers=DN)
    base = jnp.full((x.shape[0], hl, wl, w.shape[-1]), 7.0)
    sparse = scatter(base, stack, tile_pixels(plan.tiles[lo], plan.valid[lo], block=b, hw=(hl, wl)))
    outs.append((sparse, _dense(x, w, stride=s, upsample=up), plan.tile_mask(lo)[..., None]))
  return outs


def test_sparse_conv_equals_dense_conv_on_the_tiles():
  _, plan = _plan(0)
  assert all(plan.block_sizes[lo] and not bool(plan.valid[lo].all()) for lo in (0, 1))  # padded buckets
  xs = [jax.random.normal(jax.random.key(i), (2, 16 * s // up, 16 * s // up, 5)) for i, (_, s, up) in
        enumerate(((0, 1, 1), (1, 1, 1), (0, 1, 2)))]
  w = jax.random.normal(jax.random.key(9), (3, 3, 5, 7))
  for (lo, _, _), (sparse, dense, tm) in zip(GEOMETRIES, _sparse_and_dense(xs, w, plan)):
    assert dense.shape[1:3] == plan.level_shape(lo)
    np.testing.assert_allclose(np.where(tm, sparse, 0), np.where(tm, dense, 0), atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(np.where(tm, 7.0, sparse), 7.0)  # padded and inactive tiles untouched


def test_level_masks_cover_every_changed_output_of_the_entry_convs():
  """A change inside the input mask moves conv_in's outputs only inside level 0's tiles, and a change
  inside level l's mask moves the downsampler's outputs only inside level l+1's tiles."""
  mask, plan = _plan(3)
  w = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 4))
  m0 = level_masks(mask, num_levels=2, dilation=1)[0]
  x2 = x + jnp.asarray(mask)[..., None] * jax.random.normal(jax.random.key(5), x.shape)
  x3 = x + jnp.asarray(m0)[..., None] * jax.random.normal(jax.random.key(6), x.shape)


  @jax.jit
  def changes(x, x2, x3, plan):
    moved = (jnp.abs(_dense(x2, w) - _dense(x, w)).max(-1) > 0, jnp.abs(_dense(x3, w, stride=2) - _dense(x, w, stride=2)).max(-1) > 0)
    return moved, (plan.tile_mask(0), plan.tile_mask(1))

  for changed, tiles in zip(*changes(x, x2, x3, plan)):
    assert bool(changed.any()) and not bool((changed & ~tiles).any())


def test_windows_over_new_tiles_and_a_stacked_cache_equal_windows_of_the_written_map():
  """Reading a window pixel from the new tile when its tile is active and from the cached map (at a slot
  of a per-step stack) otherwise is the same as reading the map with the tiles scattered in."""
  _, plan = _plan(1)
  b = plan.block_sizes[0]
  cached = jax.random.normal(jax.random.key(0), (3, 2, 16, 16, 4))  # 3 slots
  stack = jax.random.normal(jax.random.key(1), (plan.tiles[0].shape[0] * plan.tiles[0].shape[1], b, b, 4))

  @jax.jit
  def both(cached, stack, plan):
    pixels = tile_pixels(plan.tiles[0], plan.valid[0], block=b, hw=(16, 16))
    full = scatter(cached[2], stack, pixels)
    grid = tile_grid(plan.tiles[0], plan.valid[0], grid_hw=(4, 4))
    outs = []
    for lo, s, up in GEOMETRIES[:2]:  # same-level halo and the downsampler's window, read from level 0
      hl, wl = plan.level_shape(lo)
      win = conv_windows(plan.tiles[lo], block=plan.block_sizes[lo], conv_hw=(hl * s, wl * s), stride=s)
      outs.append((gather_windows(win, full=full),
                   gather_windows(win, stack=stack, cached=cached, grid=grid, block=b, slot=2)))
    return outs

  for want, got in both(cached, stack, plan):
    np.testing.assert_array_equal(got, want)
