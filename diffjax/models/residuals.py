"""Additive residuals on a U-Net's skip connections and middle block (the ControlNet interface).

ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models")
feeds a frozen U-Net through its skip connections: the control branch produces one tensor per skip
(``down_block_additional_residuals``) and one for the middle block's output
(``mid_block_additional_residual``), and the base adds them, exactly as diffusers'
``UNet2DConditionModel.forward`` does. Both U-Nets of diffjax accept the two arguments; their parameter
trees do not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

__all__ = ["add_control_residuals"]


def add_control_residuals(
  skips: Sequence[jnp.ndarray],
  mid: jnp.ndarray,
  *,
  down_block_additional_residuals: Sequence[jnp.ndarray] | None,
  mid_block_additional_residual: jnp.ndarray | None,
) -> tuple[list[jnp.ndarray], jnp.ndarray]:
  """Adds control residuals to the skip tensors and the middle block output.

  Args:
      skips: The U-Net's skip tensors in down-path order (the stem output first), each ``[B, H_i, W_i, C_i]``.
      mid: The middle block's output ``[B, h, w, C]``.
      down_block_additional_residuals: One tensor per skip, shaped like it, or ``None``.
      mid_block_additional_residual: A tensor shaped like ``mid``, or ``None``.

  Returns:
      ``(skips, mid)`` with the residuals added (unchanged where ``None``).

  Raises:
      ValueError: Naming the argument when the count or a shape does not match the U-Net.
  """
  skips = list(skips)
  if down_block_additional_residuals is not None:
    res = list(down_block_additional_residuals)
    if len(res) != len(skips):
      raise ValueError(
        f"down_block_additional_residuals has {len(res)} tensors but the U-Net has {len(skips)} skip "
        "connections (stem + layers_per_block per level + one per downsampler)"
      )
    for i, (s, r) in enumerate(zip(skips, res)):
      if tuple(jnp.shape(r)) != tuple(s.shape):
        raise ValueError(
          f"down_block_additional_residuals[{i}] has shape {tuple(jnp.shape(r))}, expected {tuple(s.shape)}"
        )
    skips = [s + r.astype(s.dtype) for s, r in zip(skips, res)]
  if mid_block_additional_residual is not None:
    r = mid_block_additional_residual
    if tuple(jnp.shape(r)) != tuple(mid.shape):
      raise ValueError(
        f"mid_block_additional_residual has shape {tuple(jnp.shape(r))}, expected {tuple(mid.shape)}"
      )
    mid = mid + r.astype(mid.dtype)
  return skips, mid
