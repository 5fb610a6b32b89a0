"""A KL-regularised convolutional autoencoder with the layout of diffusers' ``AutoencoderKL`` (NHWC).

The autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3 and App. G): an encoder maps ``[B, H, W, C]`` images to the moments of a
diagonal Gaussian posterior over ``[B, H/f, W/f, latent_channels]`` latents, ``f = 2 ** (levels - 1)``;
a decoder maps latents back to images. Trained with a reconstruction loss plus a small KL term towards
``N(0, I)`` (the VAE of Kingma & Welling 2014 with a down-weighted KL), see
:mod:`diffjax.training.autoencoder_loss`.

Submodule names and the parameter tree mirror diffusers' ``AutoencoderKL`` state dict one to one
(``encoder.down_blocks.0.resnets.1.conv1.weight`` <-> ``encoder/down_blocks_0/resnets_1/conv1/kernel``),
so Stable-Diffusion VAE weights can be imported with :mod:`diffjax.models.autoencoder_names`. Layout::

    encoder: conv_in -> down_blocks_i (resnets_j, downsamplers_0 except the last level)
             -> mid_block (resnets_0, attentions_0, resnets_1) -> conv_norm_out -> SiLU -> conv_out
    quant_conv (1x1) -> posterior (mean, logvar)
    post_quant_conv (1x1) -> decoder: conv_in -> mid_block -> up_blocks_i (layers_per_block + 1
             resnets, upsamplers_0 except the last level) -> conv_norm_out -> SiLU -> conv_out

All GroupNorms use ``eps=1e-6`` and the residual blocks have no time embedding, as in diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from diffjax.models.attention import AttentionBlock
from diffjax.models.conv import conv
from diffjax.models.resnet import Upsample2D, group_norm

__all__ = [
  "AutoencoderKL",
  "Decoder",
  "DiagonalGaussian",
  "DownEncoderBlock2D",
  "Encoder",
  "MidBlock2D",
  "ResnetBlock",
  "UpDecoderBlock2D",
  "make_codec",
]

VAE_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1.


def conv3x3(features: int, dtype: jnp.dtype, name: str) -> nn.Conv:
  """3x3 stride-1 convolution with PyTorch-style ``padding=1``."""
  return conv(features, (3, 3), padding=PAD1, dtype=dtype, name=name)


@struct.dataclass
class DiagonalGaussian:
  """A diagonal Gaussian ``N(mean, exp(logvar))`` over latents (diffusers' ``DiagonalGaussianDistribution``).

  Attributes:
      mean: ``[B, h, w, c]`` posterior mean.
      logvar: ``[B, h, w, c]`` log-variance, already clipped to ``[-30, 20]``.
  """

  mean: jnp.ndarray
  logvar: jnp.ndarray

  @classmethod
  def from_moments(cls, moments: jnp.ndarray) -> DiagonalGaussian:
    """Splits ``[B, h, w, 2c]`` moments into mean (first ``c`` channels) and clipped log-variance."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jnp.ndarray:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jnp.ndarray:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jnp.ndarray:
    """A reparameterised sample ``mean + std * eps``, ``eps ~ N(0, I)``; ``[B, h, w, c]``."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jnp.ndarray:
    """The posterior mode (= mean); ``[B, h, w, c]``."""
    return self.mean

  def kl(self) -> jnp.ndarray:
    """``KL(q || N(0, I))`` in nats per example, ``0.5 * sum(mean^2 + var - 1 - logvar)``; ``[B]``."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))

  def nll(self, z: jnp.ndarray) -> jnp.ndarray:
    """``-log q(z)`` in nats per example; ``z: [B, h, w, c]`` -> ``[B]``."""
    return 0.5 * jnp.sum(
      jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(z - self.mean) / self.var, axis=(1, 2, 3)
    )


class ResnetBlock(nn.Module):
  """Residual block without time embedding (diffusers ``ResnetBlock2D`` with ``temb_channels=None``).

  ``h = conv2(silu(norm2(conv1(silu(norm1(x))))))``; ``out = shortcut(x) + h``, the shortcut being a
  1x1 conv ``conv_shortcut`` when the channel count changes.

  Attributes:
      out_channels: Output channels.
      norm_num_groups: GroupNorm groups (must divide the input and output channels).
      dtype: Compute dtype; parameters stay float32.
  """

  out_channels: int
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C_in]`` -> ``[B, H, W, out_channels]``."""
    h = nn.silu(group_norm(self.norm_num_groups, VAE_NORM_EPS, self.dtype, "norm1")(x))
    h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
    h = nn.silu(group_norm(self.norm_num_groups, VAE_NORM_EPS, self.dtype, "norm2")(h))
    h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class AsymmetricDownsample2D(nn.Module):
  """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right (diffusers' VAE ``Downsample2D``).

  diffusers builds the VAE downsampler with ``padding=0`` and pads ``(0, 1, 0, 1)`` first, unlike the
  U-Net's symmetric ``padding=1``; the two differ by one pixel of shift, so weights are not interchangeable.

  Attributes:
      out_channels: Output channels.
      dtype: Compute dtype.
  """

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C]`` -> ``[B, floor((H - 2) / 2) + 1, ..., out_channels]`` (``H / 2`` for even ``H``)."""
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels, (3, 3), strides=2, padding="VALID", dtype=self.dtype, name="conv")(x)


class MidBlock2D(nn.Module):
  """``resnets_0 -> attentions_0 -> resnets_1`` at the lowest resolution (diffusers ``UNetMidBlock2D``).

  The attention is single-headed over all ``h * w`` positions (``attention_head_dim = C``), as in the
  diffusers VAE.

  Attributes:
      channels: Channels ``C`` in and out.
      norm_num_groups: GroupNorm groups.
      add_attention: Whether the block has the attention layer (``mid_block_add_attention``).
      dtype: Compute dtype.
  """

  channels: int
  norm_num_groups: int = 32
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, h, w, C]`` -> ``[B, h, w, C]``."""
    x = ResnetBlock(self.channels, self.norm_num_groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(
        attention_head_dim=self.channels,
        norm_num_groups=self.norm_num_groups,
        norm_eps=VAE_NORM_EPS,
        dtype=self.dtype,
        name="attentions_0",
      )(x)
    return ResnetBlock(self.channels, self.norm_num_groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  """``num_layers`` residual blocks, then an optional asymmetric stride-2 downsampler.

  Attributes:
      out_channels: Output channels.
      num_layers: Residual blocks.
      add_downsample: Whether to halve the resolution (``downsamplers_0``).
      norm_num_groups: GroupNorm groups.
      dtype: Compute dtype.
  """

  out_channels: int
  num_layers: int
  add_downsample: bool
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C_in]`` -> ``[B, H', W', out_channels]`` (``H' = H / 2`` when downsampling)."""
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = AsymmetricDownsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """``num_layers`` residual blocks, then an optional nearest-x2 upsampler with a 3x3 conv.

  Attributes:
      out_channels: Output channels.
      num_layers: Residual blocks (the decoder uses ``layers_per_block + 1``).
      add_upsample: Whether to double the resolution (``upsamplers_0``).
      norm_num_groups: GroupNorm groups.
      dtype: Compute dtype.
  """

  out_channels: int
  num_layers: int
  add_upsample: bool
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C_in]`` -> ``[B, H', W', out_channels]`` (``H' = 2H`` when upsampling)."""
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images to posterior moments (diffusers ``Encoder`` with ``double_z=True``).

  Attributes:
      out_channels: Latent channels ``c``; the output has ``2c`` channels (mean, logvar).
      block_out_channels: Channels per level; ``len - 1`` downsamplings.
      layers_per_block: Residual blocks per level.
      norm_num_groups: GroupNorm groups.
      mid_block_add_attention: Attention in the mid block.
      dtype: Compute dtype.
  """

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C]`` -> ``[B, H/f, W/f, 2 * out_channels]``."""
    boc = tuple(self.block_out_channels)
    h = conv3x3(boc[0], self.dtype, "conv_in")(x)
    for i, ch in enumerate(boc):
      h = DownEncoderBlock2D(
        ch, self.layers_per_block, i < len(boc) - 1, self.norm_num_groups, self.dtype, name=f"down_blocks_{i}"
      )(h)
    h = MidBlock2D(boc[-1], self.norm_num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(
      h
    )
    h = nn.silu(group_norm(self.norm_num_groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(h))
    return conv3x3(2 * self.out_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents to images (diffusers ``Decoder`` with ``norm_type="group"``).

  The input of ``conv_out`` is sown as ``intermediates/conv_out_input`` (a no-op unless that collection
  is mutable); the adaptive GAN weight of :mod:`diffjax.training.autoencoder_loss` needs it.

  Attributes:
      out_channels: Image channels.
      block_out_channels: Channels per level (listed from the highest resolution, as in the encoder).
      layers_per_block: The decoder has ``layers_per_block + 1`` residual blocks per level.
      norm_num_groups: GroupNorm groups.
      mid_block_add_attention: Attention in the mid block.
      dtype: Compute dtype.
  """

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    """``[B, h, w, c]`` -> ``[B, h * f, w * f, out_channels]``."""
    rev = tuple(reversed(tuple(self.block_out_channels)))
    h = conv3x3(rev[0], self.dtype, "conv_in")(z)
    h = MidBlock2D(rev[0], self.norm_num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(
      h
    )
    for i, ch in enumerate(rev):
      h = UpDecoderBlock2D(
        ch,
        self.layers_per_block + 1,
        i < len(rev) - 1,
        self.norm_num_groups,
        self.dtype,
        name=f"up_blocks_{i}",
      )(h)
    h = nn.silu(group_norm(self.norm_num_groups, VAE_NORM_EPS, self.dtype, "conv_norm_out")(h))
    self.sow("intermediates", "conv_out_input", h)
    return conv3x3(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """KL autoencoder; keyword arguments follow diffusers' ``AutoencoderKL`` config.

  Attributes:
      in_channels: Image channels in.
      out_channels: Image channels out.
      block_out_channels: Channels per level; spatial downsampling ``f = 2 ** (len - 1)``.
      layers_per_block: Encoder residual blocks per level (the decoder has one more).
      latent_channels: Latent channels ``c``.
      norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
      mid_block_add_attention: Attention in the encoder and decoder mid blocks.
      use_quant_conv: 1x1 conv on the moments (``quant_conv``).
      use_post_quant_conv: 1x1 conv on the latents before decoding (``post_quant_conv``).
      dtype: Compute dtype; parameters stay float32.

  Example:
      >>> import jax, jax.numpy as jnp
      >>> vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
      >>> params = vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
      >>> vae.apply({"params": params}, jnp.zeros((2, 8, 8, 1)), method=vae.encode).mean.shape
      (2, 4, 4, 4)
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    for ch in self.block_out_channels:
      if ch % self.norm_num_groups:
        raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide block_out_channels {ch}")
    common = {
      "block_out_channels": tuple(self.block_out_channels),
      "layers_per_block": self.layers_per_block,
      "norm_num_groups": self.norm_num_groups,
      "mid_block_add_attention": self.mid_block_add_attention,
      "dtype": self.dtype,
    }
    self.encoder = Encoder(out_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    c = self.latent_channels
    self.quant_conv = conv(2 * c, (1, 1), dtype=self.dtype) if self.use_quant_conv else None
    self.post_quant_conv = conv(c, (1, 1), dtype=self.dtype) if self.use_post_quant_conv else None

  @property
  def downsample_factor(self) -> int:
    """Spatial factor ``f`` between images and latents."""
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: jnp.ndarray) -> DiagonalGaussian:
    """Posterior ``q(z | x)``.

    Args:
        x: ``[B, H, W, in_channels]`` images in ``[-1, 1]``; ``H, W`` divisible by ``f``.

    Returns:
        :class:`DiagonalGaussian` over ``[B, H/f, W/f, latent_channels]``.
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected images [B, H, W, {self.in_channels}], got shape {x.shape}")
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jnp.ndarray) -> jnp.ndarray:
    """Images from latents.

    Args:
        z: ``[B, h, w, latent_channels]`` (unscaled) latents.

    Returns:
        ``[B, h * f, w * f, out_channels]`` reconstructions (float32, nominally in ``[-1, 1]``).
    """
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"expected latents [B, h, w, {self.latent_channels}], got shape {z.shape}")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jnp.ndarray, key: jax.Array | None = None) -> tuple[jnp.ndarray, DiagonalGaussian]:
    """Encodes, takes the posterior sample (``key`` given) or mode, decodes.

    Args:
        x: ``[B, H, W, in_channels]`` images in ``[-1, 1]``.
        key: PRNG key for the posterior sample; ``None`` decodes the mode.

    Returns:
        ``(reconstruction [B, H, W, out_channels], posterior)``.
    """
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior


def make_codec(
  module: AutoencoderKL, *, scaling_factor: float = 1.0, shift_factor: float = 0.0
) -> tuple[Callable, Callable]:
  """Pure ``encode`` / ``decode`` functions over parameters, in the scaled latent space of diffusion.

  ``encode(params, images, key=None) -> (z - shift_factor) * scaling_factor`` with ``z`` the posterior
  mode (``key=None``) or a posterior sample; ``decode(params, latents)`` inverts the scaling and decodes
  (Rombach et al. 2022, Sec. 4.3.2: latents are rescaled to unit variance before diffusion).

  Args:
      module: The autoencoder.
      scaling_factor: Multiplier of the latents (e.g. from ``load_autoencoder``).
      shift_factor: Subtracted before scaling (0 for SD-1/2 VAEs).

  Returns:
      ``(encode, decode)``: ``encode(params, images [B, H, W, C], key=None) -> [B, h, w, c]`` and
      ``decode(params, latents [B, h, w, c]) -> [B, H, W, C]``; both are jittable.
  """

  def encode(params, images: jnp.ndarray, key: jax.Array | None = None) -> jnp.ndarray:
    posterior = module.apply({"params": params}, images, method=module.encode)
    z = posterior.mode() if key is None else posterior.sample(key)
    return (z - shift_factor) * scaling_factor

  def decode(params, latents: jnp.ndarray) -> jnp.ndarray:
    z = latents / scaling_factor + shift_factor
    return module.apply({"params": params}, z, method=module.decode)

  return encode, decode
