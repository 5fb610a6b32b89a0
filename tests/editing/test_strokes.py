"""Stroke paintings keep the layout of an image and drop its detail."""

import numpy as np
import pytest

from diffjax.data import load_digits
from diffjax.editing import stroke_paintings


def test_paintings_are_coarse_and_keep_the_layout():
  images = load_digits().images[:50]
  paint = stroke_paintings(images, cell=2, levels=3, jitter=0)
  assert paint.shape == images.shape and paint.dtype == np.uint8
  assert set(np.unique(paint)) <= {0, 128, 255}  # 3 levels: 0, 127.5 and 255 rounded
  blocks = paint.reshape(50, 4, 2, 4, 2, 1)
  assert (blocks == blocks[:, :, :1, :, :1]).all()  # flat 2x2 cells
  corr = np.corrcoef(
    paint.reshape(50, -1).astype(float).ravel(), images.reshape(50, -1).astype(float).ravel()
  )
  assert corr[0, 1] > 0.6
  jittered = stroke_paintings(images, cell=2, seed=1)
  assert not np.array_equal(jittered, paint) and np.array_equal(
    jittered, stroke_paintings(images, cell=2, seed=1)
  )


@pytest.mark.parametrize(
  "kwargs, needle",
  [
    ({"cell": 0}, "cell must be >= 1"),
    ({"levels": 1}, "levels must be >= 2"),
    ({"brush": -1}, "brush and jitter must be >= 0"),
  ],
)
def test_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    stroke_paintings(np.zeros((1, 4, 4, 1), np.uint8), **kwargs)
  with pytest.raises(ValueError, match="images must be uint8"):
    stroke_paintings(np.zeros((4, 4, 1), np.uint8))
