"""Down, mid and up blocks of the text-conditioned U-Net (NHWC).

Layout and names follow diffusers' ``CrossAttnDownBlock2D``/``DownBlock2D``, ``UNetMidBlock2DCrossAttn``
and ``CrossAttnUpBlock2D``/``UpBlock2D`` as assembled by ``UNet2DConditionModel`` (submodules
``resnets_{i}``, ``attentions_{i}`` (a :class:`~diffjax.models.transformer.Transformer2DModel`),
``downsamplers_0``, ``upsamplers_0``): the latent-diffusion U-Net of Rombach et al. 2022, whose residual
blocks are those of Ho et al. 2020 and Dhariwal & Nichol 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.attention_control import AttentionControl
from diffjax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffjax.models.transformer import Transformer2DModel

__all__ = ["CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"]


class _BlockConfig(nn.Module):
  """Fields shared by the blocks (not used on its own).

  Attributes:
      out_channels: Channels of every ResNet in the block.
      num_layers: Number of ResNet (+ transformer) layers.
      add_cross_attention: Follow each ResNet by a :class:`Transformer2DModel` (the ``CrossAttn*`` block
          types); otherwise plain ResNets (``DownBlock2D``/``UpBlock2D``).
      num_attention_heads: Heads of the transformers; ``head_dim = out_channels // heads``.
      transformer_layers: Transformer blocks per :class:`Transformer2DModel`.
      use_linear_projection: Linear ``proj_in``/``proj_out`` (see :class:`Transformer2DModel`).
      position_embedding: Fixed 2-D position embedding in the transformers (see
          :class:`Transformer2DModel`).
      norm_num_groups: GroupNorm groups.
      norm_eps: ResNet GroupNorm epsilon.
      dropout: ResNet dropout (transformer dropout stays 0, as in diffusers' U-Net).
      dtype: Compute dtype.
  """

  out_channels: int
  num_layers: int = 1
  add_cross_attention: bool = True
  num_attention_heads: int = 8
  transformer_layers: int = 1
  use_linear_projection: bool = False
  position_embedding: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def _resnet(self, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(
      self.out_channels,
      norm_num_groups=self.norm_num_groups,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      dtype=self.dtype,
      name=name,
    )

  def _transformer(self, name: str) -> Transformer2DModel:
    if self.out_channels % self.num_attention_heads:
      raise ValueError(
        f"out_channels={self.out_channels} is not divisible by num_attention_heads={self.num_attention_heads}"
      )
    return Transformer2DModel(
      num_attention_heads=self.num_attention_heads,
      attention_head_dim=self.out_channels // self.num_attention_heads,
      num_layers=self.transformer_layers,
      norm_num_groups=self.norm_num_groups,
      use_linear_projection=self.use_linear_projection,
      position_embedding=self.position_embedding,
      dtype=self.dtype,
      name=name,
    )


class CrossAttnDownBlock2D(_BlockConfig):
  """``num_layers`` x (ResNet [-> transformer]) then an optional strided-conv downsampler.

  Attributes:
      add_downsample: Append a :class:`~diffjax.models.resnet.Downsample2D` (all but the last level).
  """

  add_downsample: bool = True

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    temb: jnp.ndarray,
    context: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
  ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    """Applies the block.

    Args:
        x: ``[B, H, W, C_in]``.
        temb: ``[B, E]`` time embedding.
        context: ``[B, S, D]`` context tokens.
        mask: ``[B, S]`` context padding mask or ``None``.
        train: Enables dropout.
        attention_control: Passed to every attention layer (see
            :mod:`diffjax.models.attention_control`).

    Returns:
        ``(y, skips)``: ``y`` is ``[B, H', W', out_channels]`` (halved when downsampling); ``skips`` the
        output of every layer and of the downsampler, in order, for the up path.
    """
    skips = []
    for i in range(self.num_layers):
      x = self._resnet(f"resnets_{i}")(x, temb, train=train)
      if self.add_cross_attention:
        x = self._transformer(f"attentions_{i}")(
          x, context, mask, train=train, attention_control=attention_control
        )
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_BlockConfig):
  """Bottleneck: ResNet -> transformer (``num_layers`` of them, each followed by a ResNet).

  ``out_channels`` must equal the input channels.
  """

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    temb: jnp.ndarray,
    context: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
  ) -> jnp.ndarray:
    """Maps ``[B, H, W, C]`` to ``[B, H, W, C]`` (arguments as in :class:`CrossAttnDownBlock2D`)."""
    x = self._resnet("resnets_0")(x, temb, train=train)
    for i in range(self.num_layers):
      x = self._transformer(f"attentions_{i}")(
        x, context, mask, train=train, attention_control=attention_control
      )
      x = self._resnet(f"resnets_{i + 1}")(x, temb, train=train)
    return x


class CrossAttnUpBlock2D(_BlockConfig):
  """``num_layers`` x (concat skip -> ResNet [-> transformer]) then an optional upsampler.

  Attributes:
      add_upsample: Append a :class:`~diffjax.models.resnet.Upsample2D` (all but the last level).
  """

  add_upsample: bool = True

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    skips: Sequence[jnp.ndarray],
    temb: jnp.ndarray,
    context: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
  ) -> jnp.ndarray:
    """Applies the block.

    Args:
        x: ``[B, H, W, C_prev]``.
        skips: ``num_layers`` skip tensors ``[B, H, W, C_i]``, consumed from the end as in diffusers.
        temb: ``[B, E]``.
        context: ``[B, S, D]``.
        mask: ``[B, S]`` or ``None``.
        train: Enables dropout.
        attention_control: As in :class:`CrossAttnDownBlock2D`.

    Returns:
        ``[B, H, W, out_channels]``, or ``[B, 2H, 2W, out_channels]`` when upsampling.

    Raises:
        ValueError: If the number of skips is wrong or a skip's spatial size differs from ``x``.
    """
    skips = list(skips)
    if len(skips) != self.num_layers:
      raise ValueError(f"expected {self.num_layers} skip tensors, got {len(skips)}")
    for i in range(self.num_layers):
      skip = skips.pop()
      if skip.shape[1:3] != x.shape[1:3]:
        raise ValueError(
          f"spatial size mismatch in the up path: {x.shape[1:3]} vs skip {skip.shape[1:3]}; the input "
          "height and width must be divisible by 2**(levels-1)"
        )
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = self._resnet(f"resnets_{i}")(x, temb, train=train)
      if self.add_cross_attention:
        x = self._transformer(f"attentions_{i}")(
          x, context, mask, train=train, attention_control=attention_control
        )
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x
