"""Gather and scatter of tiles with halos, the two primitives of sparse incremental inference (SIGE).

Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models": a
convolution restricted to a set of ``b x b`` output tiles reads, for every tile, the input window the
kernel needs (the tile plus its halo; ``s (b - 1) + k`` pixels for stride ``s`` and kernel ``k``),
runs as a VALID convolution over the stack of windows, and writes the tiles back into the cached map.

Windows are gathered row-wise (rows of ``C`` contiguous floats, which XLA:CPU gathers efficiently) with
indices computed from the tile coordinates; positions outside the image are clamped on read and flagged
by a validity mask so that the caller can zero them *after* any normalisation and activation (the dense
convolution's zero padding). A nearest-neighbour 2x upsampling in front of the convolution is folded into
the indices (``source = u // 2``), so the upsampled map is never formed.

A feature whose new values exist only on its active tiles need not be written into a copy of its cached
map before the next layer reads it: :func:`gather_windows` takes each window pixel from the new tile
stack when that pixel's tile is active and from the cached map otherwise (the cached map may carry a
leading per-step axis, read at ``slot``). Full maps are only formed (:func:`scatter`) where a layer needs
every position, e.g. attention keys and values.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["Windows", "conv_windows", "gather_windows", "scatter", "tile_grid", "tile_pixels"]


@dataclasses.dataclass(frozen=True)
class Windows:
  """Source coordinates of gathered windows: ``y [B, N, win, 1]``, ``x [B, N, 1, win]`` (clamped into the
  source map), the batch index ``b [B, 1, 1, 1]``, ``valid`` float32 ``[B * N, win, win, 1]`` and ``win``."""

  b: jnp.ndarray
  y: jnp.ndarray
  x: jnp.ndarray
  valid: jnp.ndarray
  win: int


def conv_windows(
  tiles: jnp.ndarray,
  *,
  block: int,
  conv_hw: tuple[int, int],
  kernel: int = 3,
  stride: int = 1,
  pad: int = 1,
  upsample: int = 1,
) -> Windows:
  """The input windows of a convolution over the output tiles.

  Output pixel ``o`` of the convolution reads convolution-input pixels ``stride * o - pad + k``,
  ``k < kernel``; the convolution input is the source map upsampled ``upsample`` times (nearest), so
  pixel ``u`` of it is source pixel ``u // upsample``.

  Args:
      tiles: int32 ``[B, N, 2]`` output tiles (row, column) in units of ``block``.
      block: output tile edge ``b``.
      conv_hw: ``(H_c, W_c)``, the convolution input's size (after upsampling).
      kernel: kernel size ``k``.
      stride: convolution stride ``s``.
      pad: zero padding of the dense convolution.
      upsample: nearest-neighbour factor between the source map and the convolution input.

  Returns:
      The :class:`Windows`, ``win = s (b - 1) + k``, coordinates in the source map
      ``[B, H_c / upsample, W_c / upsample, C]``.
  """
  bsz = tiles.shape[0]
  hc, wc = conv_hw
  win = stride * (block - 1) + kernel
  r = jnp.arange(win, dtype=jnp.int32)
  uy = (stride * block * tiles[..., 0])[..., None] - pad + r  # [B, N, win]
  ux = (stride * block * tiles[..., 1])[..., None] - pad + r
  valid = ((uy >= 0) & (uy < hc))[..., :, None] & ((ux >= 0) & (ux < wc))[..., None, :]
  return Windows(
    b=jnp.arange(bsz, dtype=jnp.int32)[:, None, None, None],
    y=(jnp.clip(uy, 0, hc - 1) // upsample)[..., :, None],
    x=(jnp.clip(ux, 0, wc - 1) // upsample)[..., None, :],
    valid=valid.astype(jnp.float32).reshape(-1, win, win, 1),
    win=win,
  )


def tile_grid(tiles: jnp.ndarray, valid: jnp.ndarray, *, grid_hw: tuple[int, int]) -> jnp.ndarray:
  """int32 ``[B, H / b, W / b]``: for every tile of a level, its row in the flattened tile stack
  (``example * N + n``) if it is active, else -1."""
  bsz, n, _ = tiles.shape
  slot = jnp.arange(bsz * n, dtype=jnp.int32).reshape(bsz, n)
  rows = jnp.broadcast_to(jnp.arange(bsz)[:, None], (bsz, n))
  ty = jnp.where(valid, tiles[..., 0], grid_hw[0])  # padded entries land out of range and are dropped
  grid = jnp.full((bsz, *grid_hw), -1, jnp.int32)
  return grid.at[rows, ty, tiles[..., 1]].set(slot, mode="drop")


def gather_windows(
  w: Windows,
  *,
  full: jnp.ndarray | None = None,
  stack: jnp.ndarray | None = None,
  cached: jnp.ndarray | None = None,
  grid: jnp.ndarray | None = None,
  block: int | None = None,
  slot=None,
) -> jnp.ndarray:
  """Windows ``[B * N, win, win, C]`` of a feature map (not yet multiplied by ``w.valid``).

  Either from a whole map ``full`` ``[B, H, W, C]``, or from a map known as its new active tiles ``stack``
  ``[B * M, b, b, C]`` (positions given by ``grid`` from :func:`tile_grid`, tile edge ``block``) over its
  ``cached`` map ``[B, H, W, C]`` or ``[S, B, H, W, C]`` (then read at ``slot``).
  """
  if full is not None:
    _, h, wd, c = full.shape
    idx = (w.b * h + w.y) * wd + w.x
    return full.reshape(-1, c).at[idx.reshape(-1)].get(mode="promise_in_bounds").reshape(-1, w.win, w.win, c)
  bsz, h, wd, c = cached.shape[-4:]
  base = w.b if slot is None else slot * bsz + w.b
  old = cached.reshape(-1, c).at[((base * h + w.y) * wd + w.x).reshape(-1)].get(mode="promise_in_bounds")
  t = grid[w.b, w.y // block, w.x // block]  # [B, N, win, win]
  new_idx = (jnp.maximum(t, 0) * block + w.y % block) * block + w.x % block
  new = stack.reshape(-1, c).at[new_idx.reshape(-1)].get(mode="promise_in_bounds")
  rows = jnp.where((t >= 0).reshape(-1, 1), new, old)
  return rows.reshape(-1, w.win, w.win, c)


def tile_pixels(tiles: jnp.ndarray, valid: jnp.ndarray, *, block: int, hw: tuple[int, int]) -> jnp.ndarray:
  """Flat indices of the tiles' own pixels in ``[B * H * W, C]``; padded tiles point past the end.

  Args:
      tiles: int32 ``[B, N, 2]``.
      valid: bool ``[B, N]``.
      block: tile edge ``b``.
      hw: ``(H, W)`` of the map.

  Returns:
      int32 ``[B * N * b * b]``; entries of invalid tiles are distinct out-of-range indices, which
      :func:`scatter` drops.
  """
  bsz, n, _ = tiles.shape
  h, w = hw
  r = jnp.arange(block, dtype=jnp.int32)
  y = (block * tiles[..., 0])[..., None] + r
  x = (block * tiles[..., 1])[..., None] + r
  base = (jnp.arange(bsz, dtype=jnp.int32) * (h * w))[:, None, None, None]
  idx = base + y[..., :, None] * w + x[..., None, :]
  past = bsz * h * w + jnp.arange(idx.size, dtype=jnp.int32).reshape(idx.shape)
  return jnp.where(valid[..., None, None], idx, past).reshape(-1)


def scatter(full: jnp.ndarray, stack: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
  """``full`` ``[B, H, W, C]`` with the tiles ``stack`` ``[M, b, b, C]`` written at ``idx`` (from
  :func:`tile_pixels`; out-of-range entries are dropped)."""
  c = full.shape[-1]
  rows = stack.reshape(-1, c).astype(full.dtype)
  return full.reshape(-1, c).at[idx].set(rows, mode="drop", unique_indices=True).reshape(full.shape)
