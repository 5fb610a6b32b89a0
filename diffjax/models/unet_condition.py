"""Text-conditioned diffusion U-Net with cross-attention, in the layout of diffusers' ``UNet2DConditionModel``.

The denoiser of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): the residual U-Net of Ho et al. 2020 / Dhariwal & Nichol 2021 whose chosen levels
carry spatial transformers that cross-attend to a context sequence (the text encoder's hidden states,
see :mod:`diffjax.models.text_encoder`). The null condition for classifier-free guidance (Ho & Salimans
2022) is the context of the empty prompt ``""``; the model itself has no special null input.

Parameter tree (top level): ``conv_in``, ``time_embedding/{linear_1,linear_2}``, ``down_blocks_{i}``,
``mid_block``, ``up_blocks_{i}``, ``conv_norm_out``, ``conv_out``; inside the blocks ``resnets_{j}`` and
``attentions_{j}`` (:class:`~diffjax.models.transformer.Transformer2DModel`). These are diffusers'
state-dict names with ``.{i}`` joined by ``_``; :mod:`diffjax.models.unet_condition_names` converts
diffusers configs and weights (e.g. Stable Diffusion 1.x/2.x U-Nets) onto this module.

Unlike diffusers' ``attention_head_dim`` (which ``UNet2DConditionModel`` actually uses as the number of
heads), ``num_attention_heads`` here means what it says; the head width is ``channels // heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.attention_control import AttentionControl
from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.residuals import add_control_residuals
from diffjax.models.resnet import conv3x3, group_norm
from diffjax.models.unet_condition_blocks import (
  CrossAttnDownBlock2D,
  CrossAttnUpBlock2D,
  UNetMidBlock2DCrossAttn,
)

__all__ = ["UNetCondition"]


def _per_level(value: int | Sequence[int], levels: int, name: str) -> tuple[int, ...]:
  out = (int(value),) * levels if isinstance(value, int) else tuple(int(v) for v in value)
  if len(out) != levels:
    raise ValueError(f"{name} has {len(out)} entries but block_out_channels has {levels}")
  if min(out) < 1:
    raise ValueError(f"{name} entries must be >= 1, got {out}")
  return out


class UNetCondition(nn.Module):
  """Noise-prediction U-Net ``eps_theta(x_t, t, context)`` with cross-attention to ``context``.

  Attributes:
      in_channels: Input channels (4 for Stable-Diffusion latents).
      out_channels: Output channels.
      block_out_channels: Channels per level; level ``i`` works at ``H / 2**i``.
      layers_per_block: ResNet layers per down level (up levels get one more).
      cross_attention_levels: Per level, whether its down and up blocks carry transformers
          (``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D``) or not (``DownBlock2D``/``UpBlock2D``). The mid
          block always has one.
      num_attention_heads: Heads per level (an int for all levels); the mid block uses the last level's.
      transformer_layers_per_block: Transformer blocks per transformer, per level or one int.
      use_linear_projection: Linear ``proj_in``/``proj_out`` in the transformers (SD 2) instead of 1x1
          convolutions (SD 1).
      position_embedding: Add a fixed 2-D sine-cosine position embedding to the tokens of every
          transformer (off in diffusers; parameter-free, see
          :class:`~diffjax.models.transformer.Transformer2DModel`).
      norm_num_groups: GroupNorm groups everywhere.
      norm_eps: GroupNorm epsilon of the ResNets and the output norm.
      dropout: ResNet dropout (active only with ``train=True``).
      flip_sin_to_cos: Sinusoidal embedding order ``[cos, sin]``.
      freq_shift: diffusers ``freq_shift`` (``downscale_freq_shift``).
      dtype: Compute dtype (parameters are always float32).

  Example:
      >>> import jax, jax.numpy as jnp
      >>> unet = UNetCondition(in_channels=4, out_channels=4, block_out_channels=(32, 64),
      ...                      num_attention_heads=4, norm_num_groups=8)
      >>> x, ctx = jnp.zeros((2, 8, 16, 4)), jnp.zeros((2, 16, 384))
      >>> params = unet.init(jax.random.key(0), x, jnp.zeros(2), ctx)["params"]
      >>> unet.apply({"params": params}, x, jnp.array([3, 999]), ctx, jnp.ones((2, 16))).shape
      (2, 8, 16, 4)
  """

  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (64, 128)
  layers_per_block: int = 1
  cross_attention_levels: Sequence[bool] = (True, True)
  num_attention_heads: int | Sequence[int] = 8
  transformer_layers_per_block: int | Sequence[int] = 1
  use_linear_projection: bool = False
  position_embedding: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    """Total spatial reduction ``2**(levels - 1)``; H and W must be multiples of it."""
    return 2 ** (len(self.block_out_channels) - 1)

  def _check_config(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    chans = tuple(int(c) for c in self.block_out_channels)
    levels = len(chans)
    if levels == 0:
      raise ValueError("block_out_channels must be non-empty")
    if len(tuple(self.cross_attention_levels)) != levels:
      raise ValueError(
        f"cross_attention_levels has {len(tuple(self.cross_attention_levels))} entries but "
        f"block_out_channels has {levels}"
      )
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
    heads = _per_level(self.num_attention_heads, levels, "num_attention_heads")
    layers = _per_level(self.transformer_layers_per_block, levels, "transformer_layers_per_block")
    for i, c in enumerate(chans):
      if c % self.norm_num_groups:
        raise ValueError(
          f"block_out_channels[{i}]={c} not divisible by norm_num_groups={self.norm_num_groups}"
        )
      if (self.cross_attention_levels[i] or i == levels - 1) and c % heads[i]:
        raise ValueError(f"block_out_channels[{i}]={c} not divisible by num_attention_heads={heads[i]}")
    return heads, layers

  def _check_inputs(self, x, t, context, mask):
    x, context = jnp.asarray(x), jnp.asarray(context)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be [B, H, W, {self.in_channels}], got shape {x.shape}")
    b, h, w = x.shape[:3]
    f = self.downsample_factor
    if h % f or w % f:
      raise ValueError(f"x spatial size ({h}, {w}) must be divisible by 2**(levels-1)={f}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    elif t.shape != (b,):
      raise ValueError(f"t must be a scalar or have shape [B]=({b},), got shape {t.shape}")
    if context.ndim != 3 or context.shape[0] != b:
      raise ValueError(f"context must be [B={b}, S, D], got shape {context.shape}")
    if not jnp.issubdtype(context.dtype, jnp.floating):
      raise ValueError(f"context must be floating point (encoder hidden states), got dtype {context.dtype}")
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.shape != context.shape[:2]:
        raise ValueError(f"context_mask must be [B, S] = {context.shape[:2]}, got shape {mask.shape}")
    return x, t, context, mask

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    t: jnp.ndarray | float,
    context: jnp.ndarray,
    context_mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    down_block_additional_residuals: Sequence[jnp.ndarray] | None = None,
    mid_block_additional_residual: jnp.ndarray | None = None,
    attention_control: AttentionControl | None = None,
  ) -> jnp.ndarray:
    """Predicts the noise (or whatever target it was trained on).

    Args:
        x: ``[B, H, W, in_channels]``; ``H`` and ``W`` divisible by :attr:`downsample_factor`.
        t: ``[B]`` integer or float timesteps, or a scalar.
        context: ``[B, S, D]`` context tokens (text encoder hidden states; ``D`` is free).
        context_mask: ``[B, S]``, nonzero for real tokens and 0 for padding (padding is not attended
            to), or ``None`` to attend to every token.
        train: Enables dropout (needs ``rngs={'dropout': key}`` when ``dropout > 0``).
        down_block_additional_residuals: ControlNet residuals, one per skip connection and shaped like
            it (see :mod:`diffjax.models.residuals`), or ``None``.
        mid_block_additional_residual: ControlNet residual added to the middle block's output, or
            ``None``.
        attention_control: ``(probs, info) -> probs`` handed to every attention layer, or ``None``
            (see :mod:`diffjax.models.attention_control`; cross-attention maps are sown into its
            ``ATTENTION_MAPS`` collection when that is mutable).

    Returns:
        ``[B, H, W, out_channels]`` in ``dtype``.

    Raises:
        ValueError: On an invalid configuration or malformed inputs (the message names the argument).
    """
    heads, layers = self._check_config()
    x, t, context, mask = self._check_inputs(x, t, context, context_mask)
    chans = tuple(self.block_out_channels)
    levels = len(chans)
    common = {
      "use_linear_projection": self.use_linear_projection,
      "position_embedding": self.position_embedding,
      "norm_num_groups": self.norm_num_groups,
      "norm_eps": self.norm_eps,
      "dropout": self.dropout,
      "dtype": self.dtype,
    }

    t_emb = get_timestep_embedding(
      t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
    ).astype(self.dtype)
    emb = TimestepEmbedding(4 * chans[0], dtype=self.dtype, name="time_embedding")(t_emb)
    h = conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))

    skips: list[jnp.ndarray] = [h]
    for i, ch in enumerate(chans):
      h, res = CrossAttnDownBlock2D(
        ch,
        num_layers=self.layers_per_block,
        add_cross_attention=bool(self.cross_attention_levels[i]),
        num_attention_heads=heads[i],
        transformer_layers=layers[i],
        add_downsample=i < levels - 1,
        name=f"down_blocks_{i}",
        **common,
      )(h, emb, context, mask, train=train, attention_control=attention_control)
      skips.extend(res)

    h = UNetMidBlock2DCrossAttn(
      chans[-1], num_attention_heads=heads[-1], transformer_layers=layers[-1], name="mid_block", **common
    )(h, emb, context, mask, train=train, attention_control=attention_control)
    skips, h = add_control_residuals(
      skips,
      h,
      down_block_additional_residuals=down_block_additional_residuals,
      mid_block_additional_residual=mid_block_additional_residual,
    )

    n_up = self.layers_per_block + 1
    for i, level in enumerate(reversed(range(levels))):
      block_skips, skips = skips[-n_up:], skips[:-n_up]
      h = CrossAttnUpBlock2D(
        chans[level],
        num_layers=n_up,
        add_cross_attention=bool(self.cross_attention_levels[level]),
        num_attention_heads=heads[level],
        transformer_layers=layers[level],
        add_upsample=i < levels - 1,
        name=f"up_blocks_{i}",
        **common,
      )(h, block_skips, emb, context, mask, train=train, attention_control=attention_control)

    h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
    return conv3x3(self.out_channels, self.dtype, "conv_out")(h)
