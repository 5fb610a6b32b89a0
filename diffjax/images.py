"""Tiling image batches into grids and writing them as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffjax.data.pipeline import to_uint8

_MIN_AUTO_WIDTH = 256


def _as_uint8_batch(images: Any, *, name: str = "images") -> np.ndarray:
  """Returns ``uint8 [N, H, W, C]``; floats are read as ``[-1, 1]`` model range."""
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [N, H, W, C], got shape {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} must hold at least one image, got shape {x.shape}")
  if x.shape[3] not in (1, 3):
    raise ValueError(f"{name} must have C in (1, 3) channels, got shape {x.shape}")
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    return to_uint8(x)
  raise ValueError(f"{name} must be uint8 in 0..255 or float in [-1, 1], got dtype {x.dtype}")


def make_grid(images: Any, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
  """Tiles a batch of images into one image.

  Args:
      images: ``uint8 [N, H, W, C]`` (or float in ``[-1, 1]``), C in {1, 3}.
      nrow: Images per grid row; default ``ceil(sqrt(N))``.
      padding: Pixels of ``pad_value`` between images and around the border.
      pad_value: Fill value (0..255) for padding and empty cells.

  Returns:
      uint8 ``[R*(H+p)+p, nrow*(W+p)+p, C]`` with ``R = ceil(N / nrow)``, ``p = padding``.

  Raises:
      ValueError: On bad shapes, dtype, ``nrow`` or ``padding``.
  """
  x = _as_uint8_batch(images)
  n, h, w, c = x.shape
  if nrow is None:
    nrow = math.ceil(math.sqrt(n))
  if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
    raise ValueError(f"nrow must be a positive int, got {nrow!r}")
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding!r}")
  ncol = min(nrow, n)
  rows = math.ceil(n / ncol)
  grid = np.full(
    (rows * (h + padding) + padding, ncol * (w + padding) + padding, c),
    pad_value,
    dtype=np.uint8,
  )
  for i in range(n):
    r, col = divmod(i, ncol)
    top = padding + r * (h + padding)
    left = padding + col * (w + padding)
    grid[top : top + h, left : left + w] = x[i]
  return grid


def save_image_grid(
  images: Any,
  path: str | os.PathLike,
  *,
  nrow: int | None = None,
  padding: int = 2,
  scale: int | None = None,
) -> None:
  """Writes a batch of images as one PNG grid.

  Args:
      images: ``uint8 [N, H, W, C]`` or float in ``[-1, 1]``, C in {1, 3}.
      path: Output PNG path; parent directories are created.
      nrow: Images per grid row; default ``ceil(sqrt(N))``.
      padding: Pixels between images (before scaling).
      scale: Integer nearest-neighbour upscale factor; default is the
          smallest factor making the grid at least 256 px wide.

  Raises:
      ValueError: On bad inputs or a non-positive ``scale``.
  """
  grid = make_grid(images, nrow=nrow, padding=padding)
  if scale is None:
    scale = max(1, math.ceil(_MIN_AUTO_WIDTH / grid.shape[1]))
  if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
    raise ValueError(f"scale must be a positive int, got {scale!r}")
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)

  from PIL import Image  # Local: only needed when writing.

  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  # uint8 [H, W] becomes mode "L", uint8 [H, W, 3] becomes mode "RGB".
  pixels = grid[..., 0] if grid.shape[2] == 1 else grid
  Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
