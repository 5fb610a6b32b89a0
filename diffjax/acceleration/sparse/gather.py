"""Gather and scatter of tiles with halos, the two primitives of sparse incremental inference (SIGE).

Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models": a
convolution restricted to a set of ``b x b`` output tiles reads, for every tile, the input window the
kernel needs (the tile plus its halo; ``s (b - 1) + k`` pixels for stride ``s`` and kernel ``k``),
runs as a VALID convolution over the stack of windows, and writes the tiles back into the cached full
map. Windows are gathered row-wise from the flattened ``[B * H * W, C]`` map with precomputed indices
(rows of ``C`` contiguous floats, which XLA:CPU gathers and scatters efficiently); positions outside the
image are clamped on read and flagged by a validity mask so that the caller can zero them *after* any
normalisation and activation (the dense convolution's zero padding). A nearest-neighbour 2x upsampling
in front of the convolution is folded into the indices (``source = u // 2``), so the upsampled map is
never formed.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["conv_windows", "gather", "scatter", "tile_pixels"]


def conv_windows(
  tiles: jnp.ndarray,
  *,
  block: int,
  conv_hw: tuple[int, int],
  kernel: int = 3,
  stride: int = 1,
  pad: int = 1,
  upsample: int = 1,
) -> tuple[jnp.ndarray, jnp.ndarray, int]:
  """Flat source indices of the input windows of a convolution over the output tiles.

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
      ``(idx, valid, win)``: int32 ``[B * N * win * win]`` rows of the flattened source map
      ``[B * (H_c / upsample) * (W_c / upsample), C]``; float32 ``[B * N, win, win, 1]``, 0 where the
      window leaves the image; and the window edge ``win = s (b - 1) + k``.
  """
  bsz, n, _ = tiles.shape
  hc, wc = conv_hw
  hs, ws = hc // upsample, wc // upsample
  win = stride * (block - 1) + kernel
  r = jnp.arange(win, dtype=jnp.int32)
  uy = (stride * block * tiles[..., 0])[..., None] - pad + r  # [B, N, win]
  ux = (stride * block * tiles[..., 1])[..., None] - pad + r
  vy = (uy >= 0) & (uy < hc)
  vx = (ux >= 0) & (ux < wc)
  sy = jnp.clip(uy, 0, hc - 1) // upsample
  sx = jnp.clip(ux, 0, wc - 1) // upsample
  base = (jnp.arange(bsz, dtype=jnp.int32) * (hs * ws))[:, None, None, None]
  idx = base + sy[..., :, None] * ws + sx[..., None, :]  # [B, N, win, win]
  valid = (vy[..., :, None] & vx[..., None, :]).astype(jnp.float32)
  return idx.reshape(-1), valid.reshape(bsz * n, win, win, 1), win


def tile_pixels(tiles: jnp.ndarray, valid: jnp.ndarray, *, block: int, hw: tuple[int, int]) -> jnp.ndarray:
  """Flat indices of the tiles' own pixels in ``[B * H * W, C]``; padded tiles point past the end.

  Args:
      tiles: int32 ``[B, N, 2]``.
      valid: bool ``[B, N]``.
      block: tile edge ``b``.
      hw: ``(H, W)`` of the map.

  Returns:
      int32 ``[B * N * b * b]``; entries of invalid tiles are distinct out-of-range indices, which
      :func:`scatter` drops and :func:`gather` never sees.
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


def gather(full: jnp.ndarray, idx: jnp.ndarray, win: int) -> jnp.ndarray:
  """Windows ``[M, win, win, C]`` of ``full`` ``[B, H, W, C]`` at in-range flat indices ``idx``."""
  c = full.shape[-1]
  rows = full.reshape(-1, c).at[idx].get(mode="promise_in_bounds")
  return rows.reshape(-1, win, win, c)


def scatter(full: jnp.ndarray, stack: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
  """``full`` ``[B, H, W, C]`` with the tiles ``stack`` ``[M, b, b, C]`` written at ``idx`` (from
  :func:`tile_pixels`; out-of-range entries are dropped)."""
  c = full.shape[-1]
  rows = stack.reshape(-1, c).astype(full.dtype)
  return full.reshape(-1, c).at[idx].set(rows, mode="drop", unique_indices=True).reshape(full.shape)
