"""Class-conditional diffusion U-Net in Flax Linen (NHWC).

The architecture is the DDPM U-Net (Ho et al. 2020, "Denoising Diffusion
Probabilistic Models") with the improvements of Dhariwal & Nichol 2021
("Diffusion Models Beat GANs on Image Synthesis"): multi-head self-attention
at chosen resolutions and a learned class embedding added to the time
embedding. A reserved "null" class supports classifier-free guidance (Ho &
Salimans 2022, "Classifier-Free Diffusion Guidance").

Block structure and parameter names mirror diffusers' ``UNet2DModel`` (with
``down_block_types`` made of ``DownBlock2D``/``AttnDownBlock2D``,
``up_block_types`` of ``UpBlock2D``/``AttnUpBlock2D``, ``UNetMidBlock2D``,
positional time embedding and ``num_class_embeds``), so diffusers weights map
onto this tree by renaming keys (see :mod:`diffjax.models.diffusers_names`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.guidance_embedding import GuidanceEmbedding
from diffjax.models.residuals import add_control_residuals
from diffjax.models.resnet import conv3x3, group_norm
from diffjax.models.unet_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D

__all__ = ["UNet"]


class UNet(nn.Module):
  """Noise-prediction U-Net ``eps_theta(x_t, t, y)``.

  Parameter tree (top level): ``conv_in``, ``time_embedding/{linear_1,linear_2}``,
  ``class_embedding`` (if ``num_classes``), ``down_blocks_{i}``, ``mid_block``,
  ``up_blocks_{i}``, ``conv_norm_out``, ``conv_out``. Inside blocks:
  ``resnets_{j}/{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}``,
  ``attentions_{j}/{group_norm,to_q,to_k,to_v,to_out_0}``,
  ``downsamplers_0/conv``, ``upsamplers_0/conv``.

  Attributes:
      in_channels: Input image channels ``C``.
      out_channels: Output channels.
      block_out_channels: Channels per resolution level; level ``i`` works at
          ``H / 2**i``.
      layers_per_block: ResNet blocks per down level (up levels get one more).
      attention_levels: Per level, whether the down/up blocks use attention
          (``AttnDownBlock2D``/``AttnUpBlock2D``). The mid block always has one.
      attention_head_dim: Channels per head (diffusers semantics);
          ``heads = channels // attention_head_dim``.
      norm_num_groups: GroupNorm groups everywhere.
      norm_eps: GroupNorm epsilon everywhere.
      dropout: ResNet dropout rate (active only with ``train=True``).
      num_classes: Number of real classes, or ``None`` for an unconditional
          model. When set, the class table has ``num_classes + 1`` rows and
          index ``num_classes`` is the null class for classifier-free guidance.
      flip_sin_to_cos: Sinusoidal embedding order ``[cos, sin]``.
      freq_shift: diffusers ``downscale_freq_shift``.
      dtype: Compute dtype (parameters are always float32).
      attention_impl: Attention core: ``"auto"`` (blocked on CPU, einsum
          elsewhere), ``"xla"`` (plain einsum) or ``"blocked"``; see
          :mod:`diffjax.models.attention_kernels`. Same parameters and
          function either way.
      remat: Rematerialise every ResNet and attention block (``nn.remat``):
          less activation memory for about one more forward pass of compute,
          for accelerators whose memory limits the batch. Same parameters.
      norm_impl: GroupNorm implementation: ``"auto"`` (the fused per-channel form with a
          hand-written VJP on CPU, Flax's elsewhere), ``"xla"`` or ``"fused"``; see
          :mod:`diffjax.models.group_norm`. Same parameters and function either way.
      guidance_embedding: Adds a ``guidance_embedding`` subtree that embeds a per-example guidance
          weight w (call argument ``guidance``) into the time embedding, for students distilled from a
          classifier-free-guided teacher (:mod:`diffjax.distillation.guided`). Off by default; when
          off the parameter tree is unchanged.
  """

  in_channels: int = 1
  out_channels: int = 1
  block_out_channels: Sequence[int] = (32, 64)
  layers_per_block: int = 2
  attention_levels: Sequence[bool] = (False, True)
  attention_head_dim: int = 8
  norm_num_groups: int = 8
  norm_eps: float = 1e-5
  dropout: float = 0.0
  num_classes: int | None = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False
  guidance_embedding: bool = False
  norm_impl: str = "auto"

  @property
  def null_label(self) -> int:
    """Index of the null (unconditional) class, equal to ``num_classes``.

    Raises:
        ValueError: If the model is unconditional (``num_classes is None``).
    """
    if self.num_classes is None:
      raise ValueError("null_label is undefined: the model has num_classes=None")
    return int(self.num_classes)

  @property
  def downsample_factor(self) -> int:
    """Total spatial reduction ``2**(levels - 1)``; H and W must be multiples."""
    return 2 ** (len(self.block_out_channels) - 1)

  def _check_config(self) -> None:
    chans = tuple(self.block_out_channels)
    if len(chans) == 0:
      raise ValueError("block_out_channels must be non-empty")
    if len(tuple(self.attention_levels)) != len(chans):
      raise ValueError(
        f"attention_levels has {len(tuple(self.attention_levels))} entries but "
        f"block_out_channels has {len(chans)}"
      )
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
    if chans[0] < 2:
      raise ValueError(f"block_out_channels[0] must be >= 2, got {chans[0]}")
    for i, c in enumerate(chans):
      if c % self.norm_num_groups != 0:
        raise ValueError(
          f"block_out_channels[{i}]={c} not divisible by norm_num_groups={self.norm_num_groups}"
        )
      if (self.attention_levels[i] or i == len(chans) - 1) and (c % self.attention_head_dim != 0):
        raise ValueError(
          f"block_out_channels[{i}]={c} not divisible by attention_head_dim={self.attention_head_dim}"
        )
    if self.num_classes is not None and self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")

  def _check_inputs(self, x, t, label) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"x must have shape [B, H, W, C], got shape {x.shape}")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"x has {x.shape[-1]} channels (last axis) but in_channels={self.in_channels}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    b, h, w = x.shape[:3]
    f = self.downsample_factor
    if h % f != 0 or w % f != 0:
      raise ValueError(
        f"x spatial size ({h}, {w}) must be divisible by 2**(levels-1)={f} "
        f"for {len(self.block_out_channels)} levels"
      )

    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    elif t.shape != (b,):
      raise ValueError(f"t must be a scalar or have shape [B]=({b},), got shape {t.shape}")
    if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
      raise ValueError(f"t must be integer or float, got dtype {t.dtype}")

    if label is not None:
      if self.num_classes is None:
        raise ValueError("label was given but the model is unconditional (num_classes=None)")
      label = jnp.asarray(label)
      if label.shape != (b,):
        raise ValueError(f"label must have shape [B]=({b},), got shape {label.shape}")
      if not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"label must be an integer array, got dtype {label.dtype}")
    elif self.num_classes is not None:
      label = jnp.full((b,), self.num_classes, dtype=jnp.int32)
    return x, t, label

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    t: jnp.ndarray | int | float,
    label: jnp.ndarray | None = None,
    *,
    train: bool = False,
    guidance: jnp.ndarray | None = None,
    down_block_additional_residuals: Sequence[jnp.ndarray] | None = None,
    mid_block_additional_residual: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Predicts the noise (or whatever target it was trained on).

    Args:
        x: ``[B, H, W, in_channels]`` float input; ``H`` and ``W`` must be
            divisible by ``2**(len(block_out_channels) - 1)``.
        t: ``[B]`` integer or float timesteps, or a scalar broadcast to ``[B]``.
        label: ``[B]`` integer class labels in ``[0, num_classes]`` (the last
            value is the null class), or ``None``. On a class-conditional
            model ``None`` means the null class; on an unconditional model
            a label is an error.
        train: Enables dropout (needs ``rngs={'dropout': key}`` when
            ``dropout > 0``).
        guidance: ``[B]`` float guidance weights w, required by (and only accepted by) a model
            with ``guidance_embedding=True``.
        down_block_additional_residuals: ControlNet residuals, one per skip connection and shaped like
            it (see :mod:`diffjax.models.residuals`), or ``None``.
        mid_block_additional_residual: ControlNet residual added to the middle block's output, or
            ``None``.

    Returns:
        ``[B, H, W, out_channels]`` in ``dtype``.

    Raises:
        ValueError: On an invalid configuration or malformed ``x``/``t``/``label``
            (the message names the offending argument).
    """
    self._check_config()
    x, t, label = self._check_inputs(x, t, label)
    chans = tuple(self.block_out_channels)
    levels = len(chans)
    time_embed_dim = 4 * chans[0]
    common = dict(
      attention_head_dim=self.attention_head_dim,
      norm_num_groups=self.norm_num_groups,
      norm_eps=self.norm_eps,
      dropout=self.dropout,
      dtype=self.dtype,
      attention_impl=self.attention_impl,
      remat=self.remat,
      norm_impl=self.norm_impl,
    )

    # 1. Time (+ class) embedding; sinusoidal features are always float32.
    t_emb = get_timestep_embedding(
      t,
      chans[0],
      flip_sin_to_cos=self.flip_sin_to_cos,
      downscale_freq_shift=self.freq_shift,
    ).astype(self.dtype)
    emb = TimestepEmbedding(time_embed_dim, dtype=self.dtype, name="time_embedding")(t_emb)
    if self.num_classes is not None:
      class_emb = nn.Embed(self.num_classes + 1, time_embed_dim, dtype=self.dtype, name="class_embedding")(
        label
      )
      emb = emb + class_emb
    if self.guidance_embedding != (guidance is not None):
      raise ValueError(f"guidance must be given iff guidance_embedding=True (got {self.guidance_embedding})")
    if guidance is not None:
      w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), t.shape)
      emb = emb + GuidanceEmbedding(time_embed_dim, dtype=self.dtype, name="guidance_embedding")(w)

    # 2. Stem.
    h = conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))

    # 3. Down path; the skip stack starts with the stem output.
    skips: list[jnp.ndarray] = [h]
    for i, ch in enumerate(chans):
      h, res = DownBlock2D(
        ch,
        num_layers=self.layers_per_block,
        add_attention=bool(self.attention_levels[i]),
        add_downsample=i < levels - 1,
        name=f"down_blocks_{i}",
        **common,
      )(h, emb, train=train)
      skips.extend(res)

    # 4. Bottleneck.
    h = UNetMidBlock2D(name="mid_block", **common)(h, emb, train=train)
    skips, h = add_control_residuals(
      skips,
      h,
      down_block_additional_residuals=down_block_additional_residuals,
      mid_block_additional_residual=mid_block_additional_residual,
    )

    # 5. Up path over reversed levels; each block pops layers_per_block + 1 skips.
    n_up = self.layers_per_block + 1
    for i, level in enumerate(reversed(range(levels))):
      block_skips, skips = skips[-n_up:], skips[:-n_up]
      h = UpBlock2D(
        chans[level],
        num_layers=n_up,
        add_attention=bool(self.attention_levels[level]),
        add_upsample=i < levels - 1,
        name=f"up_blocks_{i}",
        **common,
      )(h, block_skips, emb, train=train)
    if skips:  # pragma: no cover - structural invariant
      raise RuntimeError(f"internal error: {len(skips)} unused skip connections")

    # 6. Head.
    h = group_norm(
      self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out", impl=self.norm_impl, silu=True
    )(h)
    return conv3x3(self.out_channels, self.dtype, "conv_out")(h)
