"""Down, mid and up blocks of the U-Net (NHWC).

Layout and names follow diffusers' ``DownBlock2D``/``AttnDownBlock2D``,
``UNetMidBlock2D`` and ``UpBlock2D``/``AttnUpBlock2D`` as assembled by
``UNet2DModel`` (submodules ``resnets_{i}``, ``attentions_{i}``,
``downsamplers_0``, ``upsamplers_0``), i.e. the DDPM U-Net of Ho et al. 2020
with the refinements of Dhariwal & Nichol 2021.

Every block can rematerialise its ResNet and attention sub-blocks
(``remat=True``: activations inside them are recomputed in the backward pass
instead of stored, trading compute for accelerator memory); parameter names
and values are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.attention import AttentionBlock
from diffjax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["DownBlock2D", "UNetMidBlock2D", "UpBlock2D"]

# ``train`` (argument 3 counting ``self``) selects dropout, so it must stay static under remat.
_RematResnetBlock2D = nn.remat(ResnetBlock2D, static_argnums=(3,))
_RematAttentionBlock = nn.remat(AttentionBlock)


class _BlockLayers:
  """Builds the ResNet and attention sub-blocks of a U-Net block from its attributes."""

  def _resnet(self, out_channels: int, name: str):
    cls = _RematResnetBlock2D if self.remat else ResnetBlock2D
    return cls(
      out_channels,
      norm_num_groups=self.norm_num_groups,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      dtype=self.dtype,
      norm_impl=self.norm_impl,
      name=name,
    )

  def _attention(self, name: str):
    cls = _RematAttentionBlock if self.remat else AttentionBlock
    return cls(
      attention_head_dim=self.attention_head_dim,
      norm_num_groups=self.norm_num_groups,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      attention_impl=self.attention_impl,
      norm_impl=self.norm_impl,
      name=name,
    )


class DownBlock2D(_BlockLayers, nn.Module):
  """``num_layers`` ResNet blocks (each optionally followed by attention),
  then an optional strided-conv downsampler.

  With ``add_attention=True`` this is diffusers' ``AttnDownBlock2D``,
  otherwise ``DownBlock2D``.

  Attributes:
      out_channels: Channels of every ResNet in the block.
      num_layers: Number of ResNet blocks (``layers_per_block``).
      add_attention: Insert an :class:`AttentionBlock` after each ResNet.
      add_downsample: Append a :class:`Downsample2D` (all but the last level).
      attention_head_dim: Channels per attention head.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      dropout: ResNet dropout rate.
      dtype: Compute dtype.
      attention_impl: Attention core (see
          :func:`diffjax.models.attention.resolve_attention_fn`).
      remat: Rematerialise the ResNet and attention sub-blocks.
      norm_impl: GroupNorm implementation (see :func:`diffjax.models.resnet.group_norm`).
  """

  out_channels: int
  num_layers: int = 2
  add_attention: bool = False
  add_downsample: bool = True
  attention_head_dim: int = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False
  norm_impl: str = "auto"

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, temb: jnp.ndarray, *, train: bool = False
  ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    """Applies the block.

    Args:
        x: ``[B, H, W, C_in]``.
        temb: ``[B, E]`` time (+ class) embedding.
        train: Enables dropout.

    Returns:
        ``(y, skips)``: ``y`` is ``[B, H', W', out_channels]`` (``H' = ceil(H/2)``
        if downsampling), ``skips`` holds the output of every ResNet(+attention)
        and of the downsampler, in order, for the up path.
    """
    skips = []
    for i in range(self.num_layers):
      x = self._resnet(self.out_channels, f"resnets_{i}")(x, temb, train)
      if self.add_attention:
        x = self._attention(f"attentions_{i}")(x)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2D(_BlockLayers, nn.Module):
  """Bottleneck: ResNet -> attention -> ResNet (diffusers ``UNetMidBlock2D``).

  Attributes:
      attention_head_dim: Channels per attention head.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      dropout: ResNet dropout rate.
      dtype: Compute dtype.
      attention_impl: Attention core (see
          :func:`diffjax.models.attention.resolve_attention_fn`).
      remat: Rematerialise the ResNet and attention sub-blocks.
      norm_impl: GroupNorm implementation (see :func:`diffjax.models.resnet.group_norm`).
  """

  attention_head_dim: int = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Applies the block.

    Args:
        x: ``[B, H, W, C]``.
        temb: ``[B, E]``.
        train: Enables dropout.

    Returns:
        ``[B, H, W, C]``.
    """
    c = x.shape[-1]
    x = self._resnet(c, "resnets_0")(x, temb, train)
    x = self._attention("attentions_0")(x)
    return self._resnet(c, "resnets_1")(x, temb, train)


class UpBlock2D(_BlockLayers, nn.Module):
  """``num_layers`` ResNet blocks on ``concat([x, skip])`` (each optionally
  followed by attention), then an optional nearest-x2 + conv upsampler.

  With ``add_attention=True`` this is diffusers' ``AttnUpBlock2D``, otherwise
  ``UpBlock2D``. ``num_layers`` is ``layers_per_block + 1`` in the U-Net.

  Attributes:
      out_channels: Channels of every ResNet in the block.
      num_layers: Number of ResNet blocks (= number of skips consumed).
      add_attention: Insert an :class:`AttentionBlock` after each ResNet.
      add_upsample: Append an :class:`Upsample2D` (all but the last up block).
      attention_head_dim: Channels per attention head.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      dropout: ResNet dropout rate.
      dtype: Compute dtype.
      attention_impl: Attention core (see
          :func:`diffjax.models.attention.resolve_attention_fn`).
      remat: Rematerialise the ResNet and attention sub-blocks.
      norm_impl: GroupNorm implementation (see :func:`diffjax.models.resnet.group_norm`).
  """

  out_channels: int
  num_layers: int = 3
  add_attention: bool = False
  add_upsample: bool = True
  attention_head_dim: int = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False
  norm_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    skips: Sequence[jnp.ndarray],
    temb: jnp.ndarray,
    *,
    train: bool = False,
  ) -> jnp.ndarray:
    """Applies the block.

    Args:
        x: ``[B, H, W, C_prev]``.
        skips: ``num_layers`` skip tensors ``[B, H, W, C_skip_i]``; they are
            consumed from the end (last one first), as in diffusers.
        temb: ``[B, E]``.
        train: Enables dropout.

    Returns:
        ``[B, H, W, out_channels]``, or ``[B, 2H, 2W, out_channels]`` when
        upsampling.

    Raises:
        ValueError: If the number of skips is wrong or a skip's spatial size
            differs from ``x`` (input size not divisible by the total
            downsampling factor).
    """
    skips = list(skips)
    if len(skips) != self.num_layers:
      raise ValueError(f"expected {self.num_layers} skip tensors, got {len(skips)}")
    for i in range(self.num_layers):
      skip = skips.pop()
      if skip.shape[1:3] != x.shape[1:3]:
        raise ValueError(
          f"spatial size mismatch in up path: upsampled features have "
          f"{x.shape[1:3]} but the skip connection has {skip.shape[1:3]}; the "
          "input height and width must be divisible by 2**(levels-1)"
        )
      x = self.concat_skip(x, skip)
      x = self._resnet(self.out_channels, f"resnets_{i}")(x, temb, train)
      if self.add_attention:
        x = self._attention(f"attentions_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x

  def concat_skip(self, x: jnp.ndarray, skip: jnp.ndarray) -> jnp.ndarray:
    """``concat([x, skip], -1)``: ``[B, H, W, C_x + C_skip]`` (no parameters).

    A method of its own so that method interception can see where the two differently-ranged halves
    meet, e.g. for Q-Diffusion's split shortcut quantization (:mod:`diffjax.quantization.fake_quant`).
    """
    return jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
