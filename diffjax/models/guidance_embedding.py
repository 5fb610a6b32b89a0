"""Embedding of the guidance weight w for guidance-distilled U-Nets.

A student distilled from a classifier-free-guided teacher takes w as an input (Meng et al. 2023, "On
Distillation of Guided Diffusion Models", Sec. 3.1): w is mapped to Fourier (sinusoidal) features, passed
through a two-layer MLP and added to the time embedding, like the timestep itself. The MLP's output layer
starts at zero, so a freshly initialised embedding adds nothing and a student whose other parameters are
copied from the teacher computes exactly the teacher's conditional prediction for every w.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.embeddings import get_timestep_embedding

__all__ = ["GuidanceEmbedding"]


class GuidanceEmbedding(nn.Module):
  """Fourier features of w -> Dense -> SiLU -> Dense (zero-initialised), ``[B] -> [B, D]``.

  Attributes:
      embed_dim: Output width ``D`` (the U-Net's time-embedding width).
      num_features: Number of sinusoidal features of ``w * scale``.
      scale: Multiplier of w before the sinusoids; 100 spreads w in [0, 10] over periods from 2 pi / 100
          to 2 pi * 10^4 / 100.
      dtype: Compute dtype; parameters stay float32.
  """

  embed_dim: int
  num_features: int = 32
  scale: float = 100.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, w: jnp.ndarray) -> jnp.ndarray:
    """Embeds guidance weights.

    Args:
        w: ``[B]`` float guidance weights (diffusers convention: 1 = conditional, 0 = unconditional).

    Returns:
        ``[B, embed_dim]`` embedding in ``dtype``; all zeros at initialisation.
    """
    feats = get_timestep_embedding(
      jnp.asarray(w, jnp.float32),
      self.num_features,
      flip_sin_to_cos=True,
      downscale_freq_shift=0.0,
      scale=self.scale,
    ).astype(self.dtype)
    h = nn.silu(nn.Dense(self.embed_dim, dtype=self.dtype, name="linear_1")(feats))
    return nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear_2")(h)
