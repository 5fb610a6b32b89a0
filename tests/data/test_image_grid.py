"""Tests for diffjax.images: grid tiling and PNG output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffjax.images import make_grid, save_image_grid


def test_make_grid_layout():
  images = np.stack([np.full((3, 2, 1), 10 * (i + 1), np.uint8) for i in range(5)])
  grid = make_grid(images, nrow=3, padding=1)
  # 2 rows x 3 cols of 3x2 images with 1 px padding.
  assert grid.shape == (2 * 4 + 1, 3 * 3 + 1, 1) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 10 and grid[1, 4, 0] == 20 and grid[1, 7, 0] == 30
  assert grid[5, 1, 0] == 40 and grid[5, 4, 0] == 50
  assert grid[5, 7, 0] == 0  # Empty cell.
  assert grid[0].max() == 0 and grid[:, 0].max() == 0  # Border padding.


def test_make_grid_default_nrow_and_float_input():
  images = np.full((9, 2, 2, 3), 1.0, np.float32)
  images[4] = -1.0
  grid = make_grid(images, padding=0)
  assert grid.shape == (6, 6, 3)
  assert grid[0, 0, 0] == 255 and grid[2, 2, 0] == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_png(tmp_path, channels):
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, channels), dtype=np.uint8)
  path = tmp_path / "nested" / "dir" / "grid.png"
  save_image_grid(images, path, padding=2)  # 4x4 grid: 4*10+2 = 42 px -> auto scale 7.
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size == (42 * 7, 42 * 7)
    assert im.mode == ("L" if channels == 1 else "RGB")
    pixels = np.asarray(im)
  if channels == 1:
    pixels = pixels[..., None]
  # Nearest-neighbour upscaling: downsample back and compare with the grid.
  np.testing.assert_array_equal(pixels[::7, ::7], make_grid(images, padding=2))


def test_save_image_grid_explicit_scale_and_nrow(tmp_path):
  images = np.zeros((3, 28, 28, 1), np.uint8)
  save_image_grid(images, tmp_path / "g.png", nrow=3, padding=0, scale=1)
  with Image.open(tmp_path / "g.png") as im:
    assert im.size == (84, 28)


def test_save_image_grid_bad_inputs(tmp_path):
  expected = r"images must have rank 4 \[N, H, W, C\], got shape \(8, 8\)"
  with pytest.raises(ValueError, match=expected):
    save_image_grid(np.zeros((8, 8), np.uint8), tmp_path / "x.png")
  with pytest.raises(ValueError, match="C in"):
    save_image_grid(np.zeros((1, 8, 8, 2), np.uint8), tmp_path / "x.png")
  with pytest.raises(ValueError, match="scale"):
    save_image_grid(np.zeros((1, 8, 8, 1), np.uint8), tmp_path / "x.png", scale=0)
  with pytest.raises(ValueError, match="nrow"):
    make_grid(np.zeros((1, 8, 8, 1), np.uint8), nrow=0)
  with pytest.raises(ValueError, match="dtype"):
    make_grid(np.zeros((1, 8, 8, 1), np.int64))
  assert not (tmp_path / "x.png").exists()
