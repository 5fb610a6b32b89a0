"""Stroke paintings from images: the coarse guides SDEdit turns into realistic images.

SDEdit (Meng et al. 2022, Sec. 4.1) evaluates stroke-based synthesis on paintings made by simplifying real
images into a few flat colour blobs. :func:`stroke_paintings` makes such guides from any image batch:
the image is thickened (a brush of ``brush`` pixels applied to the ink of grey images, i.e. pixels
brighter than the background), averaged over ``cell x cell`` blocks, quantised to ``levels`` values per
channel and shifted by a random offset of up to ``jitter`` pixels, so the result keeps the layout and the
coarse colours of the image but none of its detail.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["stroke_paintings"]


def stroke_paintings(
  images: np.ndarray, *, seed: int = 0, cell: int = 4, levels: int = 3, brush: int = 1, jitter: int = 1
) -> np.ndarray:
  """Blocky, few-level stroke paintings of ``images``.

  Args:
    images: ``uint8 [N, H, W, C]``.
    seed: seed of the per-image jitter.
    cell: side of the flat blocks in pixels (>= 1).
    levels: grey/colour levels per channel (>= 2), spread evenly over [0, 255].
    brush: dilation radius in pixels applied to each channel before averaging (0 = none).
    jitter: maximum random shift in pixels per axis (0 = none).

  Returns:
    ``uint8 [N, H, W, C]`` paintings.

  Raises:
    ValueError: naming the argument that is out of range or not a uint8 ``[N, H, W, C]`` array.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}")
  if cell < 1:
    raise ValueError(f"cell must be >= 1, got {cell}")
  if levels < 2:
    raise ValueError(f"levels must be >= 2, got {levels}")
  if brush < 0 or jitter < 0:
    raise ValueError(f"brush and jitter must be >= 0, got {brush} and {jitter}")
  n, h, w, c = images.shape
  x = images.astype(np.float32)
  if brush:
    size = (1, 2 * brush + 1, 2 * brush + 1, 1)
    x = ndimage.grey_dilation(x, size=size)
  hp, wp = -(-h // cell) * cell, -(-w // cell) * cell
  x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")
  blocks = x.reshape(n, hp // cell, cell, wp // cell, cell, c).mean(axis=(2, 4))
  step = 255.0 / (levels - 1)
  blocks = np.round(blocks / step) * step
  out = np.repeat(np.repeat(blocks, cell, axis=1), cell, axis=2)[:, :h, :w]
  if jitter:
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-jitter, jitter + 1, size=(n, 2))
    out = np.stack([np.roll(o, tuple(s), axis=(0, 1)) for o, s in zip(out, shifts, strict=True)])
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
