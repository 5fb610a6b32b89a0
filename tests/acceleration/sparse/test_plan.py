"""Masks to active tiles: per-level masks, buckets, tile masks and input checks."""

import numpy as np
import pytest

from diffjax.acceleration.sparse import bucket_size, difference_mask, level_masks, make_plan


def test_level_masks_pool_and_dilate():
  m = np.zeros((1, 16, 16), bool)
  m[0, 5, 9] = True
  m0, m1, m2 = level_masks(m, num_levels=3, dilation=1)
  assert m0.sum() == 9 and m0[0, 4:7, 8:11].all()
  # 2x2 max-pool of rows 4-6 / cols 8-10 gives rows 2-3, cols 4-5; dilated by 1: rows 1-4, cols 3-6.
  ys, xs = np.nonzero(m1[0])
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (1, 4, 3, 6)
  ys, xs = np.nonzero(m2[0])
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 3, 0, 3)  # clipped to the 4x4 map
  assert not level_masks(m, num_levels=2, dilation=0)[0][0, 4, 8]


def test_bucket_sizes_grow_by_sqrt2():
  assert [bucket_size(n, 64) for n in (0, 1, 2, 3, 5, 9, 12, 17, 23, 33, 46, 64)] == [
    1, 1, 2, 3, 6, 12, 12, 23, 23, 46, 46, 64
  ]
  assert bucket_size(3, 64, growth=2.0) == 4
  with pytest.raises(ValueError, match=r"count must be in \[0, 64\]"):
    bucket_size(65, 64)


def test_plan_tiles_cover_the_level_masks_and_pad_with_invalid_entries():
  rng = np.random.default_rng(0)
  mask = rng.random((2, 32, 32)) > 0.995
  mask[1] = False
  mask[1, 31, 0] = True
  plan = make_plan(mask, block_sizes=(4, 4, None), dilation=1)
  masks = level_masks(mask, num_levels=3, dilation=1)
  for level in (0, 1):
    tm = np.asarray(plan.tile_mask(level))
    assert tm.shape == masks[level].shape
    assert not (masks[level] & ~tm).any()  # every changed pixel lies in an active tile
    n = np.asarray(plan.num_active[level])
    np.testing.assert_array_equal(tm.reshape(2, -1).sum(1), n * 16)
    v = np.asarray(plan.valid[level])
    assert v.shape[1] == bucket_size(int(n.max()), (32 >> level) ** 2 // 16)
    np.testing.assert_array_equal(v.sum(1), n)
  assert plan.tiles[2] is None and plan.block_sizes == (4, 4, None)
  assert np.asarray(plan.tile_mask(2)).all()


def test_fully_active_levels_switch_to_dense():
  plan = make_plan(np.ones((1, 8, 8), bool), block_sizes=(2, 2))
  assert plan.block_sizes == (None, None)


def test_difference_mask():
  a = np.zeros((1, 4, 4, 3), np.float32)
  b = a.copy()
  b[0, 1, 2, 1] = 0.5
  b[0, 3, 3, 0] = 0.01
  np.testing.assert_array_equal(np.argwhere(difference_mask(b, a, threshold=0.02)), [[0, 1, 2]])
  assert difference_mask(b, a).sum() == 2


@pytest.mark.parametrize(
  "kwargs, needle",
  [
    ({"mask": np.zeros((4, 4), bool)}, "mask must be [B, H, W], got shape (4, 4)"),
    ({"mask": np.zeros((1, 6, 8), bool)}, "must be divisible by 2**(levels-1)=4"),
    ({"block_sizes": (3, None, None)}, "block_sizes[0]=3 must divide the level's size (8, 8)"),
    ({"bucket_growth": 1.0}, "bucket_growth must be > 1"),
  ],
)
def test_bad_plans(kwargs, needle):
  args = {"mask": np.zeros((1, 8, 8), bool), "block_sizes": (2, 2, None), **kwargs}
  mask = args.pop("mask")
  with pytest.raises(ValueError) as err:
    make_plan(mask, **args)
  assert needle in str(err.value)


def test_difference_mask_shapes():
  with pytest.raises(ValueError, match="edited and original must both be"):
    difference_mask(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1)))
