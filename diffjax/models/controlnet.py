"""ControlNet (Zhang, Rao & Agrawala 2023) for the cross-attention U-Net, in diffusers' ``ControlNetModel`` layout.

"Adding Conditional Control to Text-to-Image Diffusion Models": a trainable copy of a frozen U-Net's
encoder and middle block reads the noisy input plus an embedded conditioning image (edges, depth, a
low-resolution image, ...) and returns one residual per skip connection and one for the middle block,
each through a zero-initialised 1x1 convolution, so that a fresh ControlNet leaves the base model's
output exactly unchanged and training starts from the base model's behaviour. The base consumes the
residuals through ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (see
:mod:`diffjax.models.residuals`).

Parameter tree (top level), as diffusers' state-dict names with ``.{i}`` joined by ``_``:
``conv_in``, ``time_embedding/{linear_1,linear_2}``,
``controlnet_cond_embedding/{conv_in,blocks_{k},conv_out}``, ``down_blocks_{i}`` and ``mid_block``
(the same subtrees as :class:`~diffjax.models.unet_condition.UNetCondition`'s, so
:func:`controlnet_params_from_unet` copies them), ``controlnet_down_blocks_{j}`` (one per skip
connection) and ``controlnet_mid_block``. :mod:`diffjax.models.controlnet_names` converts diffusers
configs and weights.

The class-conditional pixel U-Net has its own ControlNet with the same structure,
:class:`diffjax.models.unet_controlnet.UNetControlNet`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.conv import conv
from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.resnet import conv3x3
from diffjax.models.unet_condition import UNetCondition
from diffjax.models.unet_condition_blocks import CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn

__all__ = [
  "ControlNet",
  "ControlNetConditioningEmbedding",
  "check_controlnet_cond",
  "control_residuals",
  "controlnet_params_from_unet",
  "guess_mode_scales",
]


class ControlNetConditioningEmbedding(nn.Module):
  """The conditioning-image encoder E(.) of ControlNet (diffusers ``ControlNetConditioningEmbedding``).

  ``conv_in`` (3x3) -> SiLU, then per step ``blocks_{2k}`` (3x3, same channels) -> SiLU ->
  ``blocks_{2k+1}`` (3x3, stride 2) -> SiLU, and a zero-initialised 3x3 ``conv_out``. The image is reduced
  by ``2 ** (len(block_out_channels) - 1)`` (8 for Stable Diffusion's 512-pixel images onto 64x64 latents;
  1 for a pixel-space U-Net with a one-entry ``block_out_channels``).

  Attributes:
      conditioning_embedding_channels: Output channels (the U-Net's first level width).
      block_out_channels: Channels of the encoder's steps.
      dtype: Compute dtype.
  """

  conditioning_embedding_channels: int
  block_out_channels: Sequence[int] = (16, 32, 96, 256)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cond: jnp.ndarray) -> jnp.ndarray:
    """Maps ``[B, H, W, C_cond]`` to ``[B, H / f, W / f, conditioning_embedding_channels]``."""
    chans = tuple(int(c) for c in self.block_out_channels)
    h = nn.silu(conv3x3(chans[0], self.dtype, "conv_in")(cond.astype(self.dtype)))
    for k in range(len(chans) - 1):
      h = nn.silu(conv3x3(chans[k], self.dtype, f"blocks_{2 * k}")(h))
      h = nn.silu(conv3x3(chans[k + 1], self.dtype, f"blocks_{2 * k + 1}", strides=2)(h))
    return conv(
      self.conditioning_embedding_channels,
      (3, 3),
      padding=((1, 1), (1, 1)),
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      name="conv_out",
    )(h)


def guess_mode_scales(num_down: int) -> jnp.ndarray:
  """diffusers' guess-mode weights ``logspace(-1, 0, num_down + 1)``: 0.1 for the stem skip up to 1 for the mid block.

  Args:
      num_down: Number of skip residuals.

  Returns:
      ``[num_down + 1]`` float32; entry ``i < num_down`` scales skip residual ``i``, the last the mid one.
  """
  return jnp.power(10.0, jnp.linspace(-1.0, 0.0, num_down + 1, dtype=jnp.float32))


def check_controlnet_cond(
  controlnet_cond, *, x_shape: tuple[int, ...], channels: int, factor: int
) -> jnp.ndarray:
  """Checks the conditioning image against the noisy input and returns it as an array.

  Args:
      controlnet_cond: ``[B, H * factor, W * factor, channels]``.
      x_shape: The noisy input's shape ``(B, H, W, C)``.
      channels: Expected conditioning channels.
      factor: The conditioning embedder's reduction ``2 ** (len(conditioning_embedding_out_channels) - 1)``.

  Raises:
      ValueError: Naming ``controlnet_cond`` and the expected shape.
  """
  c = jnp.asarray(controlnet_cond)
  b, h, w = x_shape[:3]
  want = (b, h * factor, w * factor, channels)
  if c.shape != want:
    raise ValueError(
      f"controlnet_cond must have shape [B, H*{factor}, W*{factor}, conditioning_channels] = {want} for "
      f"x of shape {tuple(x_shape)}, got {c.shape}"
    )
  if not jnp.issubdtype(c.dtype, jnp.floating):
    raise ValueError(f"controlnet_cond must be floating point, got dtype {c.dtype}")
  return c


def _zero_conv(channels: int, dtype, name: str) -> nn.Conv:
  return conv(
    channels,
    (1, 1),
    padding="VALID",
    dtype=dtype,
    kernel_init=nn.initializers.zeros,
    bias_init=nn.initializers.zeros,
    name=name,
  )


def control_residuals(
  skips: Sequence[jnp.ndarray],
  mid: jnp.ndarray,
  *,
  conditioning_scale,
  guess_mode: bool,
  dtype,
) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
  """The zero convolutions and scaling shared by both ControlNets (call inside a compact module).

  Creates the submodules ``controlnet_down_blocks_{j}`` and ``controlnet_mid_block`` in the calling
  module. Scaling follows diffusers: every residual times ``conditioning_scale``, and in guess mode
  additionally times :func:`guess_mode_scales`.

  Args:
      skips: The copied encoder's skip tensors ``[B, H_j, W_j, C_j]``.
      mid: The copied middle block's output ``[B, h, w, C]``.
      conditioning_scale: Scalar or ``[B]`` (may be traced).
      guess_mode: Use the guess-mode weights.
      dtype: Compute dtype.

  Returns:
      ``(down_block_res_samples, mid_block_res_sample)`` shaped like ``skips`` and ``mid``.

  Raises:
      ValueError: If ``conditioning_scale`` is neither a scalar nor ``[B]``.
  """
  b = mid.shape[0]
  scale = jnp.asarray(conditioning_scale, dtype)
  if scale.ndim:
    if scale.shape != (b,):
      raise ValueError(f"conditioning_scale must be a scalar or shaped [B]=({b},), got shape {scale.shape}")
    scale = scale.reshape(b, 1, 1, 1)
  down = [_zero_conv(s.shape[-1], dtype, f"controlnet_down_blocks_{j}")(s) for j, s in enumerate(skips)]
  mid = _zero_conv(mid.shape[-1], dtype, "controlnet_mid_block")(mid)
  if guess_mode:
    w = guess_mode_scales(len(down)).astype(dtype)
    down = [d * (w[j] * scale) for j, d in enumerate(down)]
    mid = mid * (w[-1] * scale)
  else:
    down = [d * scale for d in down]
    mid = mid * scale
  return tuple(down), mid


class ControlNet(nn.Module):
  """ControlNet for :class:`~diffjax.models.unet_condition.UNetCondition` (diffusers ``ControlNetModel``).

  The attributes other than ``conditioning_channels`` and ``conditioning_embedding_out_channels`` are
  those of the base U-Net (build with :meth:`from_unet`); see :class:`UNetCondition` for their meaning.

  Attributes:
      conditioning_channels: Channels of the conditioning image.
      conditioning_embedding_out_channels: Steps of :class:`ControlNetConditioningEmbedding`; the
          conditioning image is ``2 ** (len - 1)`` times larger than ``x`` (8x for SD's default).

  Example:
      >>> import jax, jax.numpy as jnp
      >>> unet = UNetCondition(block_out_channels=(32, 64), num_attention_heads=4, norm_num_groups=8)
      >>> cn = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,))
      >>> x, ctx, img = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 3, 16)), jnp.zeros((2, 8, 8, 1))
      >>> p = cn.init(jax.random.key(0), x, jnp.zeros(2), ctx, img)["params"]
      >>> down, mid = cn.apply({"params": p}, x, jnp.array([1, 2]), ctx, img)
      >>> len(down), mid.shape
      (5, (2, 4, 4, 64))
  """

  in_channels: int = 4
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
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

  _UNET_FIELDS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_levels",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "position_embedding",
    "norm_num_groups",
    "norm_eps",
    "dropout",
    "flip_sin_to_cos",
    "freq_shift",
    "dtype",
  )

  @classmethod
  def from_unet(
    cls,
    unet: UNetCondition,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
  ) -> ControlNet:
    """A ControlNet whose encoder copy has ``unet``'s architecture (diffusers ``ControlNetModel.from_unet``).

    Initialise its parameters from the U-Net's with :func:`controlnet_params_from_unet`.
    """
    return cls(
      conditioning_channels=conditioning_channels,
      conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
      **{f: getattr(unet, f) for f in cls._UNET_FIELDS},
    )

  @property
  def conditioning_factor(self) -> int:
    """How much larger than ``x`` the conditioning image is: ``2 ** (len(conditioning_embedding_out_channels) - 1)``."""
    return 2 ** (len(tuple(self.conditioning_embedding_out_channels)) - 1)

  def _unet(self) -> UNetCondition:
    # An unbound base U-Net of the same architecture, used only for its configuration and input checks.
    return UNetCondition(
      out_channels=self.in_channels, parent=None, **{f: getattr(self, f) for f in self._UNET_FIELDS}
    )

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    t: jnp.ndarray | float,
    context: jnp.ndarray,
    controlnet_cond: jnp.ndarray,
    context_mask: jnp.ndarray | None = None,
    *,
    conditioning_scale: jnp.ndarray | float = 1.0,
    guess_mode: bool = False,
    train: bool = False,
  ) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
    """Computes the residuals for the base U-Net.

    Args:
        x: ``[B, H, W, in_channels]`` noisy input.
        t: ``[B]`` or scalar timesteps.
        context: ``[B, S, D]`` context tokens.
        controlnet_cond: ``[B, H * f, W * f, conditioning_channels]`` conditioning image,
            ``f`` = :attr:`conditioning_factor`.
        context_mask: ``[B, S]`` or ``None``.
        conditioning_scale: Scalar or ``[B]`` multiplier of every residual (may be traced).
        guess_mode: Scale the residuals by :func:`guess_mode_scales` (0.1 at the stem to 1 at the middle).
        train: Enables dropout.

    Returns:
        ``(down_block_res_samples, mid_block_res_sample)``: one ``[B, H_j, W_j, C_j]`` tensor per skip
        connection of the base U-Net, and ``[B, H / 2**(L-1), W / 2**(L-1), C_last]``; pass them as
        ``down_block_additional_residuals`` and ``mid_block_additional_residual``.

    Raises:
        ValueError: On an invalid configuration or malformed inputs (naming the argument).
    """
    unet = self._unet()
    heads, layers = unet._check_config()
    x, t, context, mask = unet._check_inputs(x, t, context, context_mask)
    cond = check_controlnet_cond(
      controlnet_cond, x_shape=x.shape, channels=self.conditioning_channels, factor=self.conditioning_factor
    )
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
    h = h + ControlNetConditioningEmbedding(
      chans[0], self.conditioning_embedding_out_channels, dtype=self.dtype, name="controlnet_cond_embedding"
    )(cond)

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
      )(h, emb, context, mask, train=train)
      skips.extend(res)
    h = UNetMidBlock2DCrossAttn(
      chans[-1], num_attention_heads=heads[-1], transformer_layers=layers[-1], name="mid_block", **common
    )(h, emb, context, mask, train=train)
    return control_residuals(
      skips, h, conditioning_scale=conditioning_scale, guess_mode=guess_mode, dtype=self.dtype
    )


# Subtrees a ControlNet shares with its base U-Net (diffusers ``from_unet`` copies the same modules).
_SHARED_PREFIXES = ("conv_in", "time_embedding", "class_embedding", "down_blocks_", "mid_block")


def controlnet_params_from_unet(controlnet_params: Mapping[str, Any], unet_params: Mapping[str, Any]) -> dict:
  """Initialises a ControlNet's encoder copy from the base U-Net (Zhang et al. 2023, Sec. 3.2).

  Replaces ``conv_in``, ``time_embedding``, ``class_embedding`` (class-conditional U-Net),
  ``down_blocks_*`` and ``mid_block`` of ``controlnet_params`` by copies of the U-Net's; the
  conditioning embedder and the zero convolutions are kept as initialised.

  Args:
      controlnet_params: A freshly initialised ControlNet parameter tree.
      unet_params: The base U-Net's parameter tree.

  Returns:
      A new tree (the U-Net's arrays are copied, not aliased).

  Raises:
      ValueError: If a shared subtree is missing from the U-Net or its shapes differ (the two models do
          not have the same architecture).
  """
  out = dict(controlnet_params)
  for name, sub in controlnet_params.items():
    if not name.startswith(_SHARED_PREFIXES) or name.startswith("controlnet_"):
      continue
    if name not in unet_params:
      raise ValueError(f"unet_params has no {name!r} subtree: the ControlNet was built for another U-Net")
    want = jax.tree.map(lambda a: tuple(a.shape), sub)
    got = jax.tree.map(lambda a: tuple(a.shape), unet_params[name])
    if want != got:
      raise ValueError(
        f"unet_params[{name!r}] does not have the ControlNet's shapes: the U-Net's architecture differs"
      )
    out[name] = jax.tree.map(jnp.array, unet_params[name])
  return out
