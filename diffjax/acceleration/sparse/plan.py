"""Block plans for spatially sparse incremental inference (SIGE).

Li, Lin, Meng, Ermon, Han & Zhu 2022, "Efficient Spatially Sparse Inference for Conditional GANs and
Diffusion Models" (NeurIPS; https://github.com/lmxyy/sige): when an image is edited in a small region,
recompute only the blocks of every feature map that the edit touches and reuse the rest from a dense run
on the original. A :class:`SparsePlan` says which blocks: the edit's difference mask is dilated, then
reduced level by level (2x max-pool and dilation, a conservative version of SIGE's
``downsample_mask``), and every level's map is cut into non-overlapping ``b x b`` tiles; the tiles that
meet the level's mask are active. Their count is padded up to a bucket (sizes growing by about
``sqrt(2)``) so that a jitted sparse forward sees a new static shape only when an edit crosses a
bucket; padded entries are marked invalid and write nothing.

Levels with block size ``None`` (small maps where gathering does not pay) and levels whose every tile is
active run densely.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["SparsePlan", "bucket_size", "difference_mask", "level_masks", "make_plan"]


@struct.dataclass
class SparsePlan:
  """Active blocks per U-Net level, padded to static bucket sizes.

  Attributes:
      tiles: per level, int32 ``[B, N_l, 2]`` (row, column) of each active tile in units of the
          level's block size, or ``None`` where the level runs densely.
      valid: per level, bool ``[B, N_l]`` (False for bucket padding), or ``None`` for dense levels.
      num_active: per level, int32 ``[B]`` active tiles per example, or ``None`` for dense levels.
      block_sizes: per level, the tile edge ``b`` or ``None`` (dense); static.
      shape: ``(B, H, W)`` of the level-0 input; static.
  """

  tiles: tuple
  valid: tuple
  num_active: tuple
  block_sizes: tuple = struct.field(pytree_node=False)
  shape: tuple = struct.field(pytree_node=False)

  @property
  def num_levels(self) -> int:
    return len(self.block_sizes)

  def level_shape(self, level: int) -> tuple[int, int]:
    """``(H_l, W_l) = (H / 2**l, W / 2**l)``."""
    _, h, w = self.shape
    return h >> level, w >> level

  def is_sparse(self, level: int) -> bool:
    return self.block_sizes[level] is not None

  def tile_mask(self, level: int) -> jnp.ndarray:
    """``[B, H_l, W_l]`` bool: the pixels the sparse forward recomputes at ``level`` (its active tiles)."""
    b_count = self.shape[0]
    h, w = self.level_shape(level)
    if not self.is_sparse(level):
      return jnp.ones((b_count, h, w), bool)
    b = self.block_sizes[level]
    grid = jnp.zeros((b_count, h // b, w // b), bool)
    rows = jnp.broadcast_to(jnp.arange(b_count)[:, None], self.valid[level].shape)
    ty, tx = self.tiles[level][..., 0], self.tiles[level][..., 1]
    grid = grid.at[rows, ty, tx].max(self.valid[level])
    return jnp.repeat(jnp.repeat(grid, b, axis=1), b, axis=2)


def difference_mask(edited, original, *, threshold: float = 0.0) -> np.ndarray:
  """Where an edit changed the input: ``any_c |edited - original| > threshold``.

  Args:
      edited: ``[B, H, W, C]`` edited input.
      original: ``[B, H, W, C]`` the original.
      threshold: absolute change below which a pixel counts as unchanged (SIGE uses 2e-2 on images in
          [-1, 1] to ignore compression noise).

  Returns:
      ``[B, H, W]`` bool numpy mask (concrete: plans are built outside ``jit``).

  Raises:
      ValueError: If the shapes differ or are not 4-D.
  """
  a, b = np.asarray(edited), np.asarray(original)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"edited and original must both be [B, H, W, C] of one shape, got {a.shape}, {b.shape}")
  return np.any(np.abs(a.astype(np.float64) - b) > threshold, axis=-1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
  """Binary dilation of ``[B, H, W]`` by a ``(2r+1)``-square."""
  if r <= 0:
    return mask
  b, h, w = mask.shape
  p = np.pad(mask, ((0, 0), (r, r), (r, r)))
  out = np.zeros_like(mask)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      out |= p[:, dy : dy + h, dx : dx + w]
  return out


def level_masks(mask, *, num_levels: int, dilation: int = 1) -> list[np.ndarray]:
  """Per-level changed-pixel masks: ``m_0 = dilate(mask)``, ``m_{l+1} = dilate(maxpool_2(m_l))``.

  The max-pool marks every coarse pixel whose 2x2 footprint changed; the dilation by ``dilation``
  pixels (at least 1 covers a 3x3 convolution's spread, including the strided downsampler's, whose
  output ``i`` reads inputs ``2i - 1 .. 2i + 1``) is the margin SIGE adds around every resolution's mask.

  Args:
      mask: ``[B, H, W]`` bool, True where the input changed; ``H`` and ``W`` divisible by
          ``2**(num_levels - 1)``.
      num_levels: number of resolutions.
      dilation: pixels of margin added at every level.

  Returns:
      ``num_levels`` bool masks, ``[B, H / 2**l, W / 2**l]``.
  """
  m = _dilate(np.asarray(mask, bool), dilation)
  out = [m]
  for _ in range(1, num_levels):
    b, h, w = m.shape
    m = _dilate(m.reshape(b, h // 2, 2, w // 2, 2).any(axis=(2, 4)), dilation)
    out.append(m)
  return out


def bucket_size(count: int, total: int, *, growth: float = 2**0.5) -> int:
  """The smallest bucket ``>= count`` among ``total, total / growth, total / growth**2, ... , 1``."""
  if not 0 <= count <= total:
    raise ValueError(f"count must be in [0, {total}], got {count}")
  sizes = {total}
  s = float(total)
  while s > 1:
    s /= growth
    sizes.add(max(1, int(np.ceil(s))))
  return min(x for x in sizes if x >= max(count, 1))


def make_plan(
  mask,
  *,
  block_sizes: Sequence[int | None],
  dilation: int = 1,
  bucket_growth: float | None = 2**0.5,
) -> SparsePlan:
  """Builds the :class:`SparsePlan` of an edit.

  Args:
      mask: ``[B, H, W]`` bool (numpy or concrete array), True where the edited input differs from the
          original (see :func:`difference_mask`).
      block_sizes: per level (``len(block_out_channels)`` of the U-Net), the tile edge ``b`` (dividing
          the level's height and width) or ``None`` to run that level densely.
      dilation: margin in pixels added at every level (:func:`level_masks`).
      bucket_growth: ratio between consecutive bucket sizes (> 1); larger means fewer recompiles and
          more padded work. ``None``: no padding (exact counts; a jitted caller recompiles for every new
          count).

  Returns:
      The plan; levels whose every tile is active are switched to dense.

  Raises:
      ValueError: On a mask that is not ``[B, H, W]``, a block size that does not divide its level, or a
          ``bucket_growth`` <= 1.
  """
  mask = np.asarray(mask)
  if mask.ndim != 3:
    raise ValueError(f"mask must be [B, H, W], got shape {mask.shape}")
  if bucket_growth is not None and bucket_growth <= 1:
    raise ValueError(f"bucket_growth must be > 1, got {bucket_growth}")
  levels = len(block_sizes)
  bsz, h, w = mask.shape
  if h % (1 << (levels - 1)) or w % (1 << (levels - 1)):
    raise ValueError(f"mask spatial size ({h}, {w}) must be divisible by 2**(levels-1)={1 << (levels - 1)}")
  tiles, valid, counts, sizes = [], [], [], []
  for level, (m, b) in enumerate(zip(level_masks(mask, num_levels=levels, dilation=dilation), block_sizes)):
    hl, wl = m.shape[1:]
    if b is not None and (b < 1 or hl % b or wl % b):
      raise ValueError(f"block_sizes[{level}]={b} must divide the level's size ({hl}, {wl})")
    if b is None:
      tiles.append(None), valid.append(None), counts.append(None), sizes.append(None)
      continue
    grid = m.reshape(bsz, hl // b, b, wl // b, b).any(axis=(2, 4))
    total = grid.shape[1] * grid.shape[2]
    n_active = grid.reshape(bsz, -1).sum(axis=1)
    if n_active.max() == total:  # every tile changes: the dense path is the same function, cheaper
      tiles.append(None), valid.append(None), counts.append(None), sizes.append(None)
      continue
    n_max = max(int(n_active.max()), 1)
    n = n_max if bucket_growth is None else bucket_size(n_max, total, growth=bucket_growth)
    t = np.zeros((bsz, n, 2), np.int32)
    v = np.zeros((bsz, n), bool)
    for i in range(bsz):
      rc = np.argwhere(grid[i])
      t[i, : len(rc)] = rc
      v[i, : len(rc)] = True
    tiles.append(jnp.asarray(t)), valid.append(jnp.asarray(v)), sizes.append(int(b))
    counts.append(jnp.asarray(n_active, jnp.int32))
  return SparsePlan(
    tiles=tuple(tiles), valid=tuple(valid), num_active=tuple(counts), block_sizes=tuple(sizes), shape=(bsz, h, w)
  )
