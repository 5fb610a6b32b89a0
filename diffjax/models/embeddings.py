"""Timestep embeddings for the diffusion U-Net.

The sinusoidal embedding follows the Transformer positional encoding used by
Ho et al. 2020 ("Denoising Diffusion Probabilistic Models") and reproduces the
exact semantics of diffusers' ``get_timestep_embedding`` (including the
``flip_sin_to_cos`` and ``downscale_freq_shift`` options), so that weights
trained with diffusers' ``UNet2DModel`` see the same input features here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["get_timestep_embedding", "TimestepEmbedding"]


def get_timestep_embedding(
  timesteps: jnp.ndarray,
  embedding_dim: int,
  flip_sin_to_cos: bool = False,
  downscale_freq_shift: float = 1.0,
  scale: float = 1.0,
  max_period: float = 10000.0,
) -> jnp.ndarray:
  """Sinusoidal timestep embedding (DDPM, Ho et al. 2020).

  With ``half = embedding_dim // 2`` the frequencies are
  ``exp(-log(max_period) * i / (half - downscale_freq_shift))`` for
  ``i = 0 .. half - 1``. The output is ``[sin(scale * t * f), cos(scale * t * f)]``
  (or ``[cos, sin]`` when ``flip_sin_to_cos``), zero-padded by one column when
  ``embedding_dim`` is odd. Computed in float32 regardless of input dtype.

  Args:
      timesteps: ``[B]`` integer or (fractional) float timesteps.
      embedding_dim: Output feature dimension ``D``.
      flip_sin_to_cos: Put the cosine half first (diffusers ``UNet2DModel``
          default is ``True``).
      downscale_freq_shift: Shift of the frequency denominator (``0`` in
          ``UNet2DModel`` by default, ``1`` in the original DDPM code).
      scale: Multiplier applied to the arguments of sin/cos.
      max_period: Controls the lowest frequency.

  Returns:
      ``[B, D]`` float32 embedding.

  Raises:
      ValueError: If ``timesteps`` is not 1-D or ``embedding_dim`` < 2.
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D [B], got shape {timesteps.shape}")
  if embedding_dim < 2:
    raise ValueError(f"embedding_dim must be >= 2, got {embedding_dim}")
  half = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - downscale_freq_shift)
  freqs = jnp.exp(exponent)
  args = scale * timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  if flip_sin_to_cos:
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  else:
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """MLP on top of the sinusoidal embedding: Dense -> SiLU -> Dense.

  Mirrors diffusers' ``TimestepEmbedding`` (parameter names ``linear_1`` and
  ``linear_2``).

  Attributes:
      time_embed_dim: Output width (``4 * block_out_channels[0]`` in the U-Net).
      dtype: Compute dtype; parameters stay float32.
  """

  time_embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: jnp.ndarray) -> jnp.ndarray:
    """Embeds sinusoidal features.

    Args:
        emb: ``[B, D]`` sinusoidal features.

    Returns:
        ``[B, time_embed_dim]`` embedding in ``dtype``.
    """
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(emb)
    emb = nn.silu(emb)
    return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(emb)
