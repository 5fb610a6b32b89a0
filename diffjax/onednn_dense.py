"""Dense layers over many token rows on XLA:CPU whose VJP runs oneDNN 1x1-convolution gradients.

:func:`dot_general` is a drop-in for ``jax.lax.dot_general`` in Flax's ``nn.Dense(dot_general=...)``
hook (used by :func:`diffjax.models.conv.dense`). On XLA:CPU the weight gradient of a dense layer
applied to ``[B, L, C]`` tokens, ``x^T dy`` contracting over all ``B*L`` rows into a small ``[C, O]``
block, runs on one thread. The same product is a 1x1 convolution of ``[B, L, 1, C]``, for which oneDNN's
kernels (:mod:`diffjax.onednn_conv`, split over the batch by diffjax's own workers) are fast. So the
forward stays XLA's dot plus bias (oneDNN's 1x1 convolution plus the bias ran at 0.3-1.0x its speed in
``experiments/bench_dense_grad.py``), and the backward runs oneDNN's backward-data and backward-weights
primitives when there are at least :data:`BACKWARD_MIN_ROWS` rows (1.7-2.9x faster than XLA's two dots
from 1,024 to 16,384 rows of 64 channels there; 0.68x at 256 rows), else XLA's dots. Both paths compute
the same products: the choice changes speed only.

Covered: float32 ``inputs[..., L, C] @ kernel[C, O]`` with at least three input dimensions, the
standard contraction, default precision and :func:`diffjax.cpu_kernels.enabled`; anything else, and
every backend but CPU (``jax.lax.platform_dependent``), is ``jax.lax.dot_general``. Equality with XLA
(forward and gradients to 1e-5) is tested in ``tests/test_onednn_dense.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from diffjax import cpu_kernels, onednn_conv

__all__ = ["BACKWARD_MIN_ROWS", "dot_general"]

BACKWARD_MIN_ROWS = 1024
_VALID = ((0, 0), (0, 0))


def _as_image(x: jnp.ndarray) -> jnp.ndarray:
  """``[..., L, C]`` -> ``[prod(...), L, 1, C]``: the leading dims are the batch oneDNN's workers split."""
  return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], 1, x.shape[-1])


def _plain(x, w):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense_product(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """``x[..., C] @ w[C, O]`` (``x`` of rank >= 3) by XLA's dot; its VJP by the path the row count picks."""
  return _plain(x, w)


def _fwd(x, w):
  return dense_product(x, w), (x, w)


def _plain_grads(x, w, dy):
  return jax.vjp(_plain, x, w)[1](dy)


def _onednn_grads(x, w, dy):
  # the 1x1 convolution's backward alone (its VJP rule; no forward convolution)
  dx, dw = onednn_conv._vjp_bwd((1, 1), _VALID, (_as_image(x), w[None, None]), _as_image(dy))
  return dx.reshape(x.shape), dw[0, 0]


def _bwd(res, dy):
  x, w = res
  if math.prod(x.shape[:-1]) < BACKWARD_MIN_ROWS:
    return _plain_grads(x, w, dy)
  return lax.platform_dependent(x, w, dy, cpu=_onednn_grads, default=_plain_grads)


dense_product.defvjp(_fwd, _bwd)


def _contracts_last_with_first(dimension_numbers, lhs_ndim: int) -> bool:
  """Whether the dimension numbers are ``nn.Dense``'s: lhs's last axis with rhs's first, no batch axes."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  return tuple(lhs_c) == (lhs_ndim - 1,) and tuple(rhs_c) == (0,) and not tuple(lhs_b) and not tuple(rhs_b)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """``jax.lax.dot_general`` with the oneDNN path for the dense layers it covers (module docstring)."""
  plain = functools.partial(
    lax.dot_general,
    lhs,
    rhs,
    dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
    **kwargs,
  )
  if (
    kwargs
    or jnp.ndim(lhs) < 3
    or jnp.ndim(rhs) != 2
    or jnp.result_type(lhs) != jnp.float32
    or jnp.result_type(rhs) != jnp.float32
    or precision is not None
    or preferred_element_type not in (None, jnp.float32)
    or not _contracts_last_with_first(dimension_numbers, jnp.ndim(lhs))
    or 0 in lhs.shape
    or 0 in rhs.shape
    or not cpu_kernels.enabled()
  ):
    return plain()
  return dense_product(lhs, rhs)
