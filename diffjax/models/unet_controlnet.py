"""ControlNet (Zhang, Rao & Agrawala 2023) for the class-conditional pixel U-Net :class:`~diffjax.models.UNet`.

The same construction as :class:`diffjax.models.controlnet.ControlNet` (diffusers' ``ControlNetModel``)
on the ``UNet2DModel`` layout: a conditioning-image embedder ``controlnet_cond_embedding`` added after
``conv_in``, a trainable copy of the time (and class) embedding, the down blocks and the middle block,
and zero-initialised 1x1 convolutions ``controlnet_down_blocks_{j}`` (one per skip connection) and
``controlnet_mid_block``. The shared subtrees have the base U-Net's names and shapes, so
:func:`~diffjax.models.controlnet.controlnet_params_from_unet` initialises them from it; the base takes
the outputs as ``down_block_additional_residuals`` / ``mid_block_additional_residual``.

In pixel space the conditioning image usually has the size of ``x``: the default
``conditioning_embedding_out_channels=(16,)`` has no stride-2 step (diffusers' default of four steps maps
512-pixel images onto 64x64 latents).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.controlnet import (
  ControlNetConditioningEmbedding,
  check_controlnet_cond,
  control_residuals,
)
from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.resnet import conv3x3
from diffjax.models.unet import UNet
from diffjax.models.unet_blocks import DownBlock2D, UNetMidBlock2D

__all__ = ["UNetControlNet"]


class UNetControlNet(nn.Module):
  """ControlNet for the class-conditional :class:`~diffjax.models.UNet`.

  The attributes other than ``conditioning_channels`` and ``conditioning_embedding_out_channels`` are
  those of the base U-Net (build with :meth:`from_unet`; see :class:`UNet` for their meaning).

  Attributes:
      conditioning_channels: Channels of the conditioning image.
      conditioning_embedding_out_channels: Steps of
          :class:`~diffjax.models.controlnet.ControlNetConditioningEmbedding`; the conditioning image is
          ``2 ** (len - 1)`` times larger than ``x``.

  Example:
      >>> import jax, jax.numpy as jnp
      >>> unet = UNet(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=4, num_classes=10)
      >>> cn = UNetControlNet.from_unet(unet, conditioning_channels=1)
      >>> x, edges = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 1))
      >>> p = cn.init(jax.random.key(0), x, jnp.zeros(2), jnp.array([3, 10]), edges)["params"]
      >>> down, mid = cn.apply({"params": p}, x, jnp.array([1, 2]), jnp.array([3, 10]), edges)
      >>> len(down), mid.shape
      (6, (2, 4, 4, 32))
  """

  in_channels: int = 1
  conditioning_channels: int = 1
  conditioning_embedding_out_channels: Sequence[int] = (16,)
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

  _UNET_FIELDS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "attention_levels",
    "attention_head_dim",
    "norm_num_groups",
    "norm_eps",
    "dropout",
    "num_classes",
    "flip_sin_to_cos",
    "freq_shift",
    "dtype",
    "attention_impl",
    "remat",
  )

  @classmethod
  def from_unet(
    cls,
    unet: UNet,
    *,
    conditioning_channels: int = 1,
    conditioning_embedding_out_channels: Sequence[int] = (16,),
  ) -> UNetControlNet:
    """A ControlNet whose encoder copy has ``unet``'s architecture.

    Initialise its parameters from the U-Net's with
    :func:`~diffjax.models.controlnet.controlnet_params_from_unet`.

    Raises:
        ValueError: If ``unet`` has a guidance embedding (not supported by the ControlNet).
    """
    if unet.guidance_embedding:
      raise ValueError("unet has guidance_embedding=True, which UNetControlNet does not support")
    return cls(
      conditioning_channels=conditioning_channels,
      conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
      **{f: getattr(unet, f) for f in cls._UNET_FIELDS},
    )

  @property
  def conditioning_factor(self) -> int:
    """How much larger than ``x`` the conditioning image is: ``2 ** (len(conditioning_embedding_out_channels) - 1)``."""
    return 2 ** (len(tuple(self.conditioning_embedding_out_channels)) - 1)

  def _unet(self) -> UNet:
    # An unbound base U-Net of the same architecture, used only for its configuration and input checks.
    return UNet(
      out_channels=self.in_channels, parent=None, **{f: getattr(self, f) for f in self._UNET_FIELDS}
    )

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    t: jnp.ndarray | int | float,
    label: jnp.ndarray | None,
    controlnet_cond: jnp.ndarray,
    *,
    conditioning_scale: jnp.ndarray | float = 1.0,
    guess_mode: bool = False,
    train: bool = False,
  ) -> tuple[tuple[jnp.ndarray, ...], jnp.ndarray]:
    """Computes the residuals for the base U-Net.

    Args:
        x: ``[B, H, W, in_channels]`` noisy input.
        t: ``[B]`` or scalar timesteps.
        label: ``[B]`` int labels in ``[0, num_classes]`` (the last is the null class) or ``None`` (the
            null class on a class-conditional model; required ``None`` on an unconditional one).
        controlnet_cond: ``[B, H * f, W * f, conditioning_channels]``, ``f`` = :attr:`conditioning_factor`.
        conditioning_scale: Scalar or ``[B]`` multiplier of every residual (may be traced).
        guess_mode: Scale the residuals by diffusers' guess-mode weights (0.1 at the stem to 1 at the middle).
        train: Enables dropout.

    Returns:
        ``(down_block_res_samples, mid_block_res_sample)``, shaped like the base U-Net's skip tensors
        and middle-block output.

    Raises:
        ValueError: On an invalid configuration or malformed inputs (naming the argument).
    """
    unet = self._unet()
    unet._check_config()
    x, t, label = unet._check_inputs(x, t, label)
    cond = check_controlnet_cond(
      controlnet_cond, x_shape=x.shape, channels=self.conditioning_channels, factor=self.conditioning_factor
    )
    chans = tuple(self.block_out_channels)
    levels = len(chans)
    time_embed_dim = 4 * chans[0]
    common = {
      "attention_head_dim": self.attention_head_dim,
      "norm_num_groups": self.norm_num_groups,
      "norm_eps": self.norm_eps,
      "dropout": self.dropout,
      "dtype": self.dtype,
      "attention_impl": self.attention_impl,
      "remat": self.remat,
    }
    t_emb = get_timestep_embedding(
      t, chans[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
    ).astype(self.dtype)
    emb = TimestepEmbedding(time_embed_dim, dtype=self.dtype, name="time_embedding")(t_emb)
    if self.num_classes is not None:
      emb = emb + nn.Embed(self.num_classes + 1, time_embed_dim, dtype=self.dtype, name="class_embedding")(
        label
      )

    h = conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))
    h = h + ControlNetConditioningEmbedding(
      chans[0], self.conditioning_embedding_out_channels, dtype=self.dtype, name="controlnet_cond_embedding"
    )(cond)
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
    h = UNetMidBlock2D(name="mid_block", **common)(h, emb, train=train)
    return control_residuals(
      skips, h, conditioning_scale=conditioning_scale, guess_mode=guess_mode, dtype=self.dtype
    )
