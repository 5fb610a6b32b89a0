"""Residual blocks and resampling layers of the U-Net (NHWC).

Semantics follow diffusers' ``ResnetBlock2D``, ``Downsample2D`` and
``Upsample2D`` as used by ``UNet2DModel`` (``resnet_time_scale_shift="default"``,
``output_scale_factor=1``), which in turn follow the DDPM U-Net of Ho et al.
2020 and the improved architecture of Dhariwal & Nichol 2021. Submodule names
(``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
``conv_shortcut``, ``conv``) match diffusers' state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.conv import conv
from diffjax.models.group_norm import GroupNorm, resolve_norm_impl

__all__ = ["group_norm", "ResnetBlock2D", "Downsample2D", "Upsample2D"]

# Explicit symmetric padding, equal to PyTorch's ``padding=1``. Flax's 'SAME'
# pads asymmetrically for stride 2 ((0, 1) on even inputs), which would
# silently break weight compatibility with diffusers.
PAD1 = ((1, 1), (1, 1))


def group_norm(
  num_groups: int, eps: float, dtype: jnp.dtype, name: str, *, impl: str = "xla", silu: bool = False
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """GroupNorm matching ``torch.nn.GroupNorm(num_groups, C, eps)``, optionally followed by SiLU.

  Statistics are reduced in float32 with the two-pass variance for accuracy. Both implementations
  create the parameters ``{name}/scale`` and ``{name}/bias`` and compute the same function.

  Args:
      num_groups: Number of channel groups.
      eps: Variance epsilon.
      dtype: Compute dtype of the output.
      name: Submodule name.
      impl: ``"xla"`` (``nn.GroupNorm``), ``"fused"``
          (:class:`diffjax.models.group_norm.GroupNorm`, per-channel reductions and a hand-written
          VJP, faster on XLA:CPU) or ``"auto"`` (fused on the CPU backend).
      silu: Apply SiLU to the output (fused into the normalisation with ``"fused"``).

  Returns:
      A callable ``[B, ..., C] -> [B, ..., C]`` (the module, bound on first call).
  """
  if resolve_norm_impl(impl) == "fused":
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, silu=silu, name=name)
  norm = nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)
  return (lambda x: nn.silu(norm(x))) if silu else norm


def conv3x3(features: int, dtype: jnp.dtype, name: str, strides: int = 1) -> nn.Conv:
  """3x3 convolution with PyTorch-style ``padding=1``."""
  return conv(features, (3, 3), strides=strides, padding=PAD1, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """Time-conditioned residual block.

  ``h = conv1(silu(norm1(x))) + Dense(silu(temb))[:, None, None, :]``;
  ``h = conv2(dropout(silu(norm2(h))))``; ``out = shortcut(x) + h`` where the
  shortcut is a 1x1 conv when the channel count changes.

  Attributes:
      out_channels: Output channels ``C_out``.
      norm_num_groups: GroupNorm groups (must divide both in/out channels).
      norm_eps: GroupNorm epsilon.
      dropout: Dropout rate before ``conv2`` (active only when ``train``).
      dtype: Compute dtype; parameters stay float32.
      norm_impl: GroupNorm(+SiLU) implementation, see :func:`group_norm` (same parameters).
  """

  out_channels: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Applies the block.

    Args:
        x: ``[B, H, W, C_in]`` feature map.
        temb: ``[B, E]`` time (+ class) embedding.
        train: Enables dropout (needs the ``'dropout'`` rng). Positional or
            keyword, so that ``nn.remat`` can mark it static.

    Returns:
        ``[B, H, W, C_out]`` feature map.
    """
    norm = lambda name: group_norm(
      self.norm_num_groups, self.norm_eps, self.dtype, name, impl=self.norm_impl, silu=True
    )
    h = norm("norm1")(x)
    h = conv3x3(self.out_channels, self.dtype, "conv1")(h)

    t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + t[:, None, None, :]

    h = norm("norm2")(h)
    h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = conv3x3(self.out_channels, self.dtype, "conv2")(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Downsample2D(nn.Module):
  """Strided 3x3 conv halving H and W (``ceil(H / 2)`` for odd sizes).

  Attributes:
      out_channels: Output channels.
      dtype: Compute dtype.
  """

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Downsamples.

    Args:
        x: ``[B, H, W, C]``.

    Returns:
        ``[B, ceil(H/2), ceil(W/2), out_channels]``.
    """
    return conv3x3(self.out_channels, self.dtype, "conv", strides=2)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv.

  Attributes:
      out_channels: Output channels.
      dtype: Compute dtype.
  """

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Upsamples.

    Args:
        x: ``[B, H, W, C]``.

    Returns:
        ``[B, 2H, 2W, out_channels]``.
    """
    # Nearest x2 == torch.nn.functional.interpolate(scale_factor=2, mode="nearest").
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv3x3(self.out_channels, self.dtype, "conv")(x)
