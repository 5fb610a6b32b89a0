"""Conditioning images for ControlNet computed from the images themselves (pure ``jnp``, jit-friendly).

Zhang et al. 2023 train ControlNets on pairs (image, signal) where the signal is computed from the
image by a fixed detector (Canny edges, depth, pose, ...). For grey digits:

* ``edges``: Sobel gradient magnitude (Sobel & Feldman 1968) with Canny's non-maximum suppression along
  the gradient direction (Canny 1986, thin one-pixel edges) and a threshold: a binary edge map;
* ``low_res``: the digit average-pooled by ``factor`` and enlarged back (nearest), a coarse layout;
* ``masked``: the digit with the lower half blanked out, plus the mask as a second channel (inpainting-
  style control).

Images are ``[B, H, W, C]`` in the model range ``[-1, 1]``; every signal is float32 in ``[0, 1]``, of the
same height and width. The same edge detector scores the samples of a controlled model
(:func:`edge_agreement`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "CONTROL_KINDS",
  "control_channels",
  "control_signal",
  "edge_agreement",
  "low_resolution",
  "masked_digit",
  "sobel_edges",
]

CONTROL_KINDS = ("edges", "low_res", "masked")

_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])  # static taps


def _check_images(images, name: str = "images") -> jnp.ndarray:
  x = jnp.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"{name} must be [B, H, W, C] in [-1, 1], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"{name} must be floating point in [-1, 1] (see diffjax.data.to_model_range), got {x.dtype}"
    )
  return x.astype(jnp.float32)


def _gradients(images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Sobel derivatives of the grey image in [0, 1], edge-replicated borders; each ``[B, H, W]``."""
  g = (jnp.mean(images, axis=-1) + 1.0) / 2.0
  p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
  h, w = g.shape[1:]
  gx = sum(_SOBEL_X[i, j] * p[:, i : i + h, j : j + w] for i in range(3) for j in range(3) if _SOBEL_X[i, j])
  gy = sum(_SOBEL_X[j, i] * p[:, i : i + h, j : j + w] for i in range(3) for j in range(3) if _SOBEL_X[j, i])
  return gx, gy


def sobel_edges(images, *, threshold: float = 0.3, thin: bool = True) -> jnp.ndarray:
  """Binary edge map: Sobel magnitude (/4, so a unit step scores 1), optionally thinned, thresholded.

  Args:
      images: ``[B, H, W, C]`` in ``[-1, 1]`` (channels are averaged).
      threshold: Edge where the normalised magnitude exceeds it.
      thin: Canny's non-maximum suppression: keep a pixel only if its magnitude is a maximum among its
          two neighbours along the (4-direction quantised) gradient.

  Returns:
      ``[B, H, W, 1]`` float32 in ``{0, 1}``.
  """
  x = _check_images(images)
  gx, gy = _gradients(x)
  mag = jnp.sqrt(gx * gx + gy * gy) / 4.0
  if thin:
    p = jnp.pad(mag, ((0, 0), (1, 1), (1, 1)))
    h, w = mag.shape[1:]

    def shifted(di, dj):
      return p[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    angle = jnp.mod(jnp.arctan2(gy, gx), jnp.pi)  # direction of the gradient, in [0, pi)
    sector = jnp.mod(jnp.round(angle / (jnp.pi / 4)), 4).astype(jnp.int32)  # 0: x, 1: diag, 2: y, 3: anti
    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (row, col) step along the gradient per sector
    keep = jnp.zeros_like(mag, bool)
    for s, (di, dj) in enumerate(offsets):
      # Ties (a step edge answers equally on both of its sides) keep the pixel before the step.
      local_max = (mag >= shifted(di, dj)) & (mag > shifted(-di, -dj))
      keep = keep | ((sector == s) & local_max)
    mag = jnp.where(keep, mag, 0.0)
  return (mag > threshold).astype(jnp.float32)[..., None]


def low_resolution(images, *, factor: int = 4) -> jnp.ndarray:
  """Average-pools by ``factor`` (edge-padded to a multiple) and enlarges back by nearest repetition.

  Returns:
      ``[B, H, W, C]`` float32 in ``[0, 1]``.
  """
  x = _check_images(images)
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}")
  b, h, w, c = x.shape
  ph, pw = -h % factor, -w % factor
  p = jnp.pad((x + 1.0) / 2.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
  pooled = p.reshape(b, (h + ph) // factor, factor, (w + pw) // factor, factor, c).mean(axis=(2, 4))
  up = jnp.repeat(jnp.repeat(pooled, factor, axis=1), factor, axis=2)
  return up[:, :h, :w]


def masked_digit(images, *, keep_rows: int | None = None) -> jnp.ndarray:
  """The digit with rows from ``keep_rows`` on blanked, and the keep-mask as a second channel.

  Args:
      images: ``[B, H, W, 1]`` in ``[-1, 1]``.
      keep_rows: Rows kept from the top (default ``H // 2``).

  Returns:
      ``[B, H, W, 2]`` float32 in ``[0, 1]``: (masked grey image, mask).
  """
  x = _check_images(images)
  if x.shape[-1] != 1:
    raise ValueError(f"images must have one channel for masked_digit, got {x.shape[-1]}")
  h = x.shape[1]
  k = h // 2 if keep_rows is None else int(keep_rows)
  if not 0 <= k <= h:
    raise ValueError(f"keep_rows must be in [0, {h}], got {k}")
  mask = (jnp.arange(h) < k).astype(jnp.float32)[None, :, None, None]
  mask = jnp.broadcast_to(mask, x.shape)
  return jnp.concatenate([(x + 1.0) / 2.0 * mask, mask], axis=-1)


def control_signal(kind: str, images, **kwargs) -> jnp.ndarray:
  """Dispatches to :func:`sobel_edges` (``"edges"``), :func:`low_resolution` or :func:`masked_digit`.

  Raises:
      ValueError: On an unknown ``kind``.
  """
  fns = {"edges": sobel_edges, "low_res": low_resolution, "masked": masked_digit}
  if kind not in fns:
    raise ValueError(f"kind={kind!r} is not one of {CONTROL_KINDS}")
  return fns[kind](images, **kwargs)


def control_channels(kind: str) -> int:
  """Channels of the signal ``kind`` for one-channel images (1, or 2 for ``masked``)."""
  if kind not in CONTROL_KINDS:
    raise ValueError(f"kind={kind!r} is not one of {CONTROL_KINDS}")
  return 2 if kind == "masked" else 1


@jax.jit
def _iou_l1(a, b):
  inter = jnp.sum(a * b, axis=(1, 2, 3))
  union = jnp.sum(jnp.maximum(a, b), axis=(1, 2, 3))
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
  return iou, jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))


def edge_agreement(control_edges, samples, *, threshold: float = 0.3, thin: bool = True, tolerance: int = 0):
  """How well samples follow edge maps: per-sample IoU and L1 between the control edges and theirs.

  Args:
      control_edges: ``[B, H, W, 1]`` binary edge maps (from :func:`sobel_edges`).
      samples: ``[B, H, W, C]`` generated images in ``[-1, 1]``.
      threshold, thin: The detector's settings (use the ones that made ``control_edges``).
      tolerance: Dilate both edge maps by this many pixels (3x3 max-pool steps) before comparing, so a
          one-pixel shift still counts as agreement.

  Returns:
      ``(iou [B], l1 [B])``; IoU is 1 where both maps are empty.
  """
  a = jnp.asarray(control_edges, jnp.float32)
  b = sobel_edges(samples, threshold=threshold, thin=thin)
  if a.shape != b.shape:
    raise ValueError(f"control_edges must have shape {b.shape} (one map per sample), got {a.shape}")
  for _ in range(int(tolerance)):
    a = jax.lax.reduce_window(a, 0.0, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    b = jax.lax.reduce_window(b, 0.0, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  return _iou_l1(a, b)
