"""Spatial transformer blocks with cross-attention to a text context (NHWC).

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
Sec. 3.3) conditions the U-Net on text through cross-attention: at chosen resolutions the feature map is
flattened to ``H * W`` tokens that pass through transformer blocks (Vaswani et al. 2017) of

* self-attention among the image tokens,
* cross-attention from the image tokens (queries) to the context tokens (keys and values), with padded
  context tokens masked out,
* a gated GELU feed-forward layer (GEGLU, Shazeer 2020, "GLU Variants Improve Transformer"),

each pre-normalised with LayerNorm and added back residually. The whole stack sits between a GroupNorm
plus ``proj_in`` and a ``proj_out`` with a residual connection around it.

Module and parameter names mirror diffusers' ``Transformer2DModel`` and ``BasicTransformerBlock``
(``norm``, ``proj_in``, ``transformer_blocks_{i}/{norm1, attn1, norm2, attn2, norm3, ff}``,
``attn*/{to_q, to_k, to_v, to_out_0}``, ``ff/net_0/proj``, ``ff/net_2``), so Stable-Diffusion weights map
onto this tree by the renaming rules of :mod:`diffjax.models.diffusers_names`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.attention_control import ATTENTION_MAPS, AttentionControl, AttentionInfo, apply_control
from diffjax.models.conv import conv, dense

__all__ = [
  "GEGLU",
  "Attention",
  "BasicTransformerBlock",
  "FeedForward",
  "Transformer2DModel",
  "attend",
  "attention_probs",
  "masked_attention",
  "sincos_position_embedding_2d",
]

# diffusers: the Transformer2DModel GroupNorm uses eps 1e-6; the block LayerNorms use 1e-5.
TRANSFORMER_GROUP_NORM_EPS = 1e-6


def attention_probs(q: jnp.ndarray, k: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Multi-head attention probabilities ``softmax(q k^T / sqrt(d))`` with optional key padding mask.

  Logits and softmax are float32 (diffusers ``upcast_softmax``).

  Args:
      q: ``[B, L, heads, d]`` queries.
      k: ``[B, S, heads, d]`` keys.
      mask: ``[B, S]``, nonzero for keys to attend to and 0 for padding, or ``None`` (attend to all).
          Every row must keep at least one key.

  Returns:
      float32 ``[B, heads, L, S]``, summing to 1 over ``S``.

  Raises:
      ValueError: If the shapes disagree.
  """
  if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q, k must be [B, L, heads, d] with matching B, heads, d; got {q.shape}, {k.shape}")
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if mask is not None:
    if mask.shape != (k.shape[0], k.shape[1]):
      raise ValueError(f"mask must be [B, S] = {k.shape[:2]}, got {mask.shape}")
    logits = jnp.where(mask[:, None, None, :] != 0, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def attend(probs: jnp.ndarray, v: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
  """Per-head ``probs @ v``: ``[B, heads, L, S]`` and ``[B, S, heads, d]`` to ``[B, L, heads, d]`` (``dtype``)."""
  return jnp.einsum("bhls,bshd->blhd", probs, v.astype(jnp.float32)).astype(dtype)


def masked_attention(
  q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
  """Multi-head ``softmax(q k^T / sqrt(d)) v`` with optional key padding mask.

  Logits and softmax are float32 (diffusers ``upcast_softmax``); the result is cast to ``q.dtype``.

  Args:
      q: ``[B, L, heads, d]`` queries.
      k: ``[B, S, heads, d]`` keys.
      v: ``[B, S, heads, d]`` values.
      mask: ``[B, S]``, nonzero for keys to attend to and 0 for padding, or ``None`` (attend to all).
          Every row must keep at least one key.

  Returns:
      ``[B, L, heads, d]``.

  Raises:
      ValueError: If the shapes disagree.
  """
  if k.shape != v.shape:
    raise ValueError(f"q, k, v must be [B, L, heads, d] with matching B, heads, d; got {q.shape}, {k.shape}")
  return attend(attention_probs(q, k, mask), v, q.dtype)


def sincos_position_embedding_2d(height: int, width: int, dim: int) -> jnp.ndarray:
  """Fixed 2-D sine-cosine position embedding of a ``height x width`` grid (as in MAE and DiT).

  The first half of the channels encodes the row, the second half the column, each as
  ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``, ``k < dim / 4``.

  Args:
      height: Rows ``H``.
      width: Columns ``W``.
      dim: Channels ``D``, a multiple of 4.

  Returns:
      float32 ``[H * W, D]`` (row-major positions, matching ``x.reshape(B, H * W, D)``).

  Raises:
      ValueError: If ``dim`` is not a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"the 2-D sine-cosine position embedding needs channels divisible by 4, got {dim}")
  omega = 1.0 / 10000.0 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))

  def encode(pos: jnp.ndarray) -> jnp.ndarray:
    angles = pos[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  rows, cols = jnp.meshgrid(
    jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
  )
  return jnp.concatenate([encode(rows.reshape(-1)), encode(cols.reshape(-1))], axis=-1)


class Attention(nn.Module):
  """Multi-head attention of ``x`` to itself or to a context (diffusers ``Attention``, no biases on q/k/v).

  Cross-attention probabilities are sown into :data:`~diffjax.models.attention_control.ATTENTION_MAPS`
  (kept only when the caller makes that collection mutable), and ``attention_control`` may rewrite the
  probabilities of any layer (see :mod:`diffjax.models.attention_control`).

  Attributes:
      heads: Number of heads.
      dim_head: Channels per head; the inner width is ``heads * dim_head``.
      dropout: Dropout on the output projection (``to_out.1``), active with ``train=True``.
      dtype: Compute dtype; parameters stay float32.
  """

  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    context: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
    spatial_shape: tuple[int, int] | None = None,
  ) -> jnp.ndarray:
    """Attends.

    Args:
        x: ``[B, L, C]`` query tokens.
        context: ``[B, S, D]`` key/value tokens; ``None`` for self-attention.
        mask: ``[B, S]`` key padding mask (nonzero = keep) or ``None``.
        train: Enables dropout.
        attention_control: ``(probs [B, heads, L, S], AttentionInfo) -> probs`` or ``None``.
        spatial_shape: ``(H, W)`` with ``H * W = L`` when the tokens are a feature map (recorded maps
            are then ``[B, heads, H, W, S]``), else ``None``.

    Returns:
        ``[B, L, C]``.
    """
    b, length, c = x.shape
    inner = self.heads * self.dim_head
    source = x if context is None else context.astype(self.dtype)

    def proj(name: str, tokens: jnp.ndarray) -> jnp.ndarray:
      out = dense(inner, use_bias=False, dtype=self.dtype, name=name)(tokens)
      return out.reshape(b, tokens.shape[1], self.heads, self.dim_head)

    q, k, v = proj("to_q", x), proj("to_k", source), proj("to_v", source)
    probs = attention_probs(q, k, mask)
    if context is not None and not self.is_initializing():
      hw = (b, self.heads, *spatial_shape, probs.shape[-1]) if spatial_shape else probs.shape
      self.sow(ATTENTION_MAPS, "probs", probs.reshape(hw))
    if attention_control is not None:
      info = AttentionInfo("/".join(self.scope.path), context is not None, spatial_shape)
      probs = apply_control(attention_control, probs, info)
    out = attend(probs, v, q.dtype)
    out = dense(c, dtype=self.dtype, name="to_out_0")(out.reshape(b, length, inner))
    return nn.Dropout(self.dropout, deterministic=not train)(out)


class GEGLU(nn.Module):
  """``h * gelu(g)`` with ``(h, g)`` the two halves of one projection (diffusers ``GEGLU``, exact GELU).

  Attributes:
      dim_out: Output width (the projection ``proj`` has ``2 * dim_out`` outputs).
      dtype: Compute dtype.
  """

  dim_out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps ``[..., C]`` to ``[..., dim_out]``."""
    h, gate = jnp.split(dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward ``net_2(dropout(net_0(x)))`` with inner width ``mult * C`` (diffusers ``FeedForward``).

  Attributes:
      mult: Inner width multiplier.
      dropout: Dropout after the GEGLU (``net.1``).
      dtype: Compute dtype.
  """

  mult: int = 4
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Maps ``[..., C]`` to ``[..., C]``."""
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual.

  Attributes:
      heads: Attention heads.
      dim_head: Channels per head (``heads * dim_head`` equals the token width).
      dropout: Dropout in attention outputs and the feed-forward layer.
      norm_eps: LayerNorm epsilon.
      dtype: Compute dtype.
  """

  heads: int
  dim_head: int
  dropout: float = 0.0
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    context: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
    spatial_shape: tuple[int, int] | None = None,
  ) -> jnp.ndarray:
    """Applies the block.

    Args:
        x: ``[B, L, C]`` image tokens.
        context: ``[B, S, D]`` context tokens (e.g. text encoder hidden states).
        mask: ``[B, S]`` context padding mask (nonzero = real token) or ``None``.
        train: Enables dropout.
        attention_control: Passed to both attention layers (see :class:`Attention`).
        spatial_shape: ``(H, W)`` of the tokens, passed to both attention layers.

    Returns:
        ``[B, L, C]``.
    """

    def norm(name: str) -> nn.LayerNorm:
      return nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, name=name)

    attn = {"heads": self.heads, "dim_head": self.dim_head, "dropout": self.dropout, "dtype": self.dtype}
    ctl = {"attention_control": attention_control, "spatial_shape": spatial_shape}
    x = x + Attention(**attn, name="attn1")(norm("norm1")(x), train=train, **ctl)
    x = x + Attention(**attn, name="attn2")(norm("norm2")(x), context, mask, train=train, **ctl)
    ff = FeedForward(dropout=self.dropout, dtype=self.dtype, name="ff")
    return x + ff(norm("norm3")(x), train=train)


class Transformer2DModel(nn.Module):
  """GroupNorm -> ``proj_in`` -> transformer blocks over ``H * W`` tokens -> ``proj_out``, plus the input.

  Attributes:
      num_attention_heads: Heads per block.
      attention_head_dim: Channels per head; the token width is ``heads * head_dim`` (equal to the input
          channels in the U-Net).
      num_layers: Number of :class:`BasicTransformerBlock`.
      norm_num_groups: Groups of the input GroupNorm.
      use_linear_projection: ``proj_in``/``proj_out`` are linear layers on the tokens (Stable Diffusion 2)
          instead of 1x1 convolutions (Stable Diffusion 1).
      position_embedding: Add :func:`sincos_position_embedding_2d` to the tokens after ``proj_in``. Not
          in diffusers (its U-Net attention is position-blind apart from what the convolutions carry);
          parameter-free, so the parameter tree and weight import are unchanged. It lets the queries of
          cross-attention depend on where a token is, e.g. to bind "on the left" to the left half.
      dropout: Dropout inside the blocks.
      dtype: Compute dtype.
  """

  num_attention_heads: int
  attention_head_dim: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  position_embedding: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    context: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    train: bool = False,
    attention_control: AttentionControl | None = None,
  ) -> jnp.ndarray:
    """Applies the spatial transformer.

    Args:
        x: ``[B, H, W, C]`` feature map.
        context: ``[B, S, D]`` context tokens.
        mask: ``[B, S]`` context padding mask or ``None``.
        train: Enables dropout.
        attention_control: Passed to every attention layer (see :class:`Attention`).

    Returns:
        ``[B, H, W, C]``.
    """
    b, h, w, c = x.shape
    inner = self.num_attention_heads * self.attention_head_dim
    n = nn.GroupNorm(
      num_groups=self.norm_num_groups,
      epsilon=TRANSFORMER_GROUP_NORM_EPS,
      dtype=self.dtype,
      use_fast_variance=False,
      name="norm",
    )(x)
    if self.use_linear_projection:
      tokens = dense(inner, dtype=self.dtype, name="proj_in")(n.reshape(b, h * w, c))
    else:
      tokens = conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(n).reshape(b, h * w, inner)
    if self.position_embedding:
      tokens = tokens + sincos_position_embedding_2d(h, w, inner).astype(tokens.dtype)[None]
    for i in range(self.num_layers):
      tokens = BasicTransformerBlock(
        heads=self.num_attention_heads,
        dim_head=self.attention_head_dim,
        dropout=self.dropout,
        dtype=self.dtype,
        name=f"transformer_blocks_{i}",
      )(tokens, context, mask, train=train, attention_control=attention_control, spatial_shape=(h, w))
    if self.use_linear_projection:
      out = dense(c, dtype=self.dtype, name="proj_out")(tokens).reshape(b, h, w, c)
    else:
      out = conv(c, (1, 1), dtype=self.dtype, name="proj_out")(tokens.reshape(b, h, w, inner))
    return out + x
