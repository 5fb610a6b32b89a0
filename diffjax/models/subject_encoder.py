"""FastComposer's subject image encoder and its text-image fusion MLP (Flax Linen).

FastComposer (Xiao et al. 2023, "FastComposer: Tuning-Free Multi-Subject Image Generation with Localized
Attention", Sec. 3.2) encodes each reference image of a subject into one embedding and fuses it into the
text condition: the text encoder's output at the subject's word ``c_i`` is replaced by
``MLP([c_i ; v_j])``, where ``v_j`` is the subject's image embedding. The paper encodes references with
a CLIP ViT; with no pretrained image model offline, :class:`SubjectEncoder` is a small CNN trained from
scratch with the rest of the model. :class:`SubjectFuser` follows the structure of the authors' post-fuse
module (two pre-LayerNorm GELU MLPs, the first on ``[c_i ; v_j]`` with a residual to ``c_i``, the second
residual, then a LayerNorm).

Example:
    >>> import jax, jax.numpy as jnp
    >>> enc, fuse = SubjectEncoder(embed_dim=64), SubjectFuser()
    >>> refs = jnp.zeros((3, 28, 28, 1))
    >>> pe = enc.init(jax.random.key(0), refs)["params"]
    >>> v = enc.apply({"params": pe}, refs)                       # [3, 64]
    >>> c = jnp.zeros((3, 384))
    >>> pf = fuse.init(jax.random.key(1), c, v)["params"]
    >>> fuse.apply({"params": pf}, c, v).shape
    (3, 384)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffjax.models.conv import conv

__all__ = ["SubjectEncoder", "SubjectFuser"]


class SubjectEncoder(nn.Module):
  """CNN from a reference image to one subject embedding.

  Per level: a 3x3 convolution, GroupNorm and SiLU, then a stride-2 3x3 convolution (so a 28x28 digit
  ends at 7x7); the map is flattened (shape matters for handwriting, so no global pooling) and
  projected to ``embed_dim``.

  Attributes:
      features: Channels per level.
      embed_dim: Width ``E`` of the embedding.
      norm_num_groups: GroupNorm groups (must divide every entry of ``features``).
  """

  features: Sequence[int] = (32, 64)
  embed_dim: int = 256
  norm_num_groups: int = 8

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Encodes references.

    Args:
        images: ``[B, h, w, C]`` in ``[-1, 1]``; ``h`` and ``w`` divisible by ``2 ** len(features)``.

    Returns:
        float32 ``[B, embed_dim]``.

    Raises:
        ValueError: If ``images`` is not ``[B, h, w, C]`` with sides divisible by ``2 ** len(features)``.
    """
    f = 2 ** len(self.features)
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images must be [B, h, w, C] with h, w divisible by {f}, got shape {images.shape}")
    x = images.astype(jnp.float32)
    for i, ch in enumerate(self.features):
      if ch % self.norm_num_groups:
        raise ValueError(f"features[{i}]={ch} is not divisible by norm_num_groups={self.norm_num_groups}")
      x = conv(ch, (3, 3), name=f"conv_{i}")(x)
      x = nn.silu(nn.GroupNorm(num_groups=self.norm_num_groups, name=f"norm_{i}")(x))
      x = conv(ch, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"down_{i}")(x)
    x = nn.silu(x.reshape(x.shape[0], -1))
    return nn.Dense(self.embed_dim, name="proj")(x)


class _MLP(nn.Module):
  """LayerNorm -> Dense(hidden) -> GELU -> Dense(out), optionally plus the input."""

  hidden: int
  out: int
  residual: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.LayerNorm(epsilon=1e-5, name="layernorm")(x)
    h = nn.Dense(self.out, name="fc2")(nn.gelu(nn.Dense(self.hidden, name="fc1")(h), approximate=False))
    return x + h if self.residual else h


class SubjectFuser(nn.Module):
  """FastComposer's fusion of a subject word's text embedding with the subject's image embedding.

  ``fused = LN(mlp2(mlp1([c ; v]) + c))`` with ``mlp2`` residual, all widths ``D`` (the text width).
  """

  @nn.compact
  def __call__(self, text: jnp.ndarray, subject: jnp.ndarray) -> jnp.ndarray:
    """Fuses.

    Args:
        text: ``[..., D]`` text-encoder outputs at the subject words.
        subject: ``[..., E]`` subject embeddings (same leading shape).

    Returns:
        float32 ``[..., D]``.

    Raises:
        ValueError: If the leading shapes differ.
    """
    if text.shape[:-1] != subject.shape[:-1]:
      raise ValueError(
        f"text [..., D] and subject [..., E] must share leading dims, got {text.shape}, {subject.shape}"
      )
    d = text.shape[-1]
    text = text.astype(jnp.float32)
    h = _MLP(d, d, name="mlp1")(jnp.concatenate([text, subject.astype(jnp.float32)], axis=-1)) + text
    h = _MLP(d, d, residual=True, name="mlp2")(h)
    return nn.LayerNorm(epsilon=1e-5, name="layer_norm")(h)
