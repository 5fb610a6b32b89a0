"""Photo patches (disjoint training / held-out columns) and padding."""

import numpy as np
import pytest

from diffjax.data import load_digits
from diffjax.data.photos import load_photo_patches, pad_images


def _photo(h=40, w=50, seed=0):
  # Each pixel encodes its column, so a patch tells where it came from.
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = np.arange(w)[None, :]
  img[..., 1] = np.random.default_rng(seed).integers(0, 255, (h, w))
  return img


def test_patches_come_from_disjoint_columns():
  train, held = load_photo_patches(
    patch_size=8, num_train=50, holdout_fraction=0.2, photos=[_photo(), _photo()]
  )
  assert train.images.shape == (50, 8, 8, 3) and train.images.dtype == np.uint8
  assert int(train.images[..., 0].max()) < 40  # training columns 0..39
  assert int(held.images[..., 0].min()) >= 40  # held-out columns 40..49
  # 40 rows / 8 = 5 rows of patches, one patch across the 10 held-out columns, two photographs.
  assert held.images.shape == (10, 8, 8, 3)
  again, _ = load_photo_patches(patch_size=8, num_train=50, holdout_fraction=0.2, photos=[_photo(), _photo()])
  np.testing.assert_array_equal(again.images, train.images)


def test_patches_reject_small_regions():
  with pytest.raises(ValueError, match="too small"):
    load_photo_patches(patch_size=16, num_train=4, holdout_fraction=0.2, photos=[_photo()])


def test_sample_photographs_split():
  train, held = load_photo_patches(patch_size=32, num_train=10)
  assert held.images.shape == (2 * 13 * 4, 32, 32, 3)
  assert len(train) == 10


def test_pad_images():
  ds = pad_images(load_digits(), 12)
  assert ds.images.shape[1:] == (12, 12, 1)
  assert int(ds.images[:, :2].max()) == 0
  with pytest.raises(ValueError, match="symmetrically"):
    pad_images(load_digits(), 11)
