"""Spatial self-attention for the U-Net (NHWC).

``AttentionBlock`` mirrors the ``Attention`` module that diffusers'
``UNet2DModel`` places in ``AttnDownBlock2D``/``AttnUpBlock2D``/``UNetMidBlock2D``
(GroupNorm, ``to_q``/``to_k``/``to_v`` projections, multi-head softmax attention
over the ``H * W`` tokens, ``to_out.0`` projection and a residual connection),
as in the DDPM U-Net (Ho et al. 2020) and Dhariwal & Nichol 2021.

The attention core is a standalone function: :func:`dot_product_attention`
(the plain einsum form, best under XLA on GPU/TPU) or
:func:`diffjax.models.attention_kernels.blocked_attention` (the same function
with a blocked, hand-differentiated formulation that is much faster on
XLA:CPU); ``attention_impl="auto"`` picks per backend.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.attention_kernels import blocked_attention
from diffjax.models.conv import dense
from diffjax.models.resnet import group_norm

__all__ = ["ATTENTION_IMPLS", "AttentionBlock", "dot_product_attention", "resolve_attention_fn"]

AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]

ATTENTION_IMPLS = ("auto", "xla", "blocked")


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v``.

  Logits and softmax are computed in float32 (diffusers ``upcast_softmax``),
  the result is cast back to ``q.dtype``.

  Args:
      q: ``[B, L, heads, d]`` queries.
      k: ``[B, S, heads, d]`` keys.
      v: ``[B, S, heads, d]`` values.

  Returns:
      ``[B, L, heads, d]`` attended values.

  Raises:
      ValueError: If the shapes are inconsistent.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, heads, d]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"incompatible q/k/v shapes: {q.shape}, {k.shape}, {v.shape}")
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhls,bshd->blhd", weights, v.astype(jnp.float32))
  return out.astype(q.dtype)


def resolve_attention_fn(impl: str) -> AttentionFn:
  """The attention core for an ``attention_impl`` name.

  Args:
      impl: ``"xla"`` (:func:`dot_product_attention`), ``"blocked"``
          (:func:`~diffjax.models.attention_kernels.blocked_attention`) or
          ``"auto"`` (``"blocked"`` on the CPU backend, ``"xla"`` elsewhere).

  Returns:
      A function ``(q, k, v) -> out`` on ``[B, L, heads, d]`` arrays.

  Raises:
      ValueError: If ``impl`` is not one of :data:`ATTENTION_IMPLS`.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
  if impl == "auto":
    impl = "blocked" if jax.default_backend() == "cpu" else "xla"
  return blocked_attention if impl == "blocked" else dot_product_attention


class AttentionBlock(nn.Module):
  """Residual multi-head self-attention over the spatial positions.

  ``out = x + to_out_0(attn(to_q(n), to_k(n), to_v(n)))`` with
  ``n = group_norm(x)`` flattened to ``[B, H*W, C]``.

  Attributes:
      attention_head_dim: Channels per head (diffusers ``attention_head_dim``);
          ``heads = C // attention_head_dim``.
      norm_num_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      dtype: Compute dtype; parameters stay float32.
      attention_impl: Which attention core to use when ``attention_fn`` is
          ``None``; see :func:`resolve_attention_fn`.
      attention_fn: An explicit attention core with the signature of
          :func:`dot_product_attention` (overrides ``attention_impl``).
      norm_impl: GroupNorm implementation (see :func:`diffjax.models.resnet.group_norm`).
  """

  attention_head_dim: int = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "auto"
  attention_fn: AttentionFn | None = None
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies self-attention.

    Args:
        x: ``[B, H, W, C]`` with ``C % attention_head_dim == 0``.

    Returns:
        ``[B, H, W, C]``.

    Raises:
        ValueError: If ``C`` is not divisible by ``attention_head_dim``.
    """
    b, h, w, c = x.shape
    if c % self.attention_head_dim != 0:
      raise ValueError(f"channels ({c}) must be divisible by attention_head_dim ({self.attention_head_dim})")
    heads = c // self.attention_head_dim

    n = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "group_norm", impl=self.norm_impl)(x)
    n = n.reshape(b, h * w, c)
    q = dense(c, dtype=self.dtype, name="to_q")(n)
    k = dense(c, dtype=self.dtype, name="to_k")(n)
    v = dense(c, dtype=self.dtype, name="to_v")(n)

    def split(t: jnp.ndarray) -> jnp.ndarray:
      return t.reshape(b, h * w, heads, self.attention_head_dim)

    out = self.attend(split(q), split(k), split(v)).reshape(b, h * w, c)
    out = dense(c, dtype=self.dtype, name="to_out_0")(out)
    return x + out.reshape(b, h, w, c).astype(x.dtype)

  def attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """The attention core on ``[B, L, heads, d]`` queries, keys and values (no parameters).

    A method of its own so that method interception (``nn.intercept_methods``) can see and replace
    the ``q k^T`` and ``p v`` products, e.g. with fake-quantized ones
    (:mod:`diffjax.quantization.fake_quant`).
    """
    attend = self.attention_fn or resolve_attention_fn(self.attention_impl)
    return attend(q, k, v)
