"""Dense layers over token rows on XLA:CPU: a native forward with the bias fused, oneDNN gradients.

:func:`dot_general` is a drop-in for ``jax.lax.dot_general`` in Flax's ``nn.Dense(dot_general=...)``
hook (used by :func:`diffjax.models.conv.dense`). On XLA:CPU the weight gradient of a dense layer
applied to ``[B, L, C]`` tokens, ``x^T dy`` contracting over all ``B*L`` rows into a small ``[C, O]``
block, runs on one thread. The same product is a 1x1 convolution of ``[B, L, 1, C]``, for which oneDNN's
kernels (:mod:`diffjax.onednn_conv`, split over the batch by diffjax's own workers) are fast. So the
hook's forward stays XLA's dot (oneDNN's 1x1 convolution plus the bias ran at 0.3-1.0x XLA's dot plus
bias in ``experiments/bench_dense_grad.py``), and the backward runs oneDNN's backward-data and
backward-weights primitives when there are at least :data:`BACKWARD_MIN_ROWS` rows (2.1-3.8x faster than
XLA's two dots from 1,024 to 16,384 rows of 64 channels there; 0.68x at 256 rows), else XLA's dots. Both paths compute
the same products: the choice changes speed only.

:func:`dense_bias` is the whole layer, ``x @ w + b``, for :class:`diffjax.models.conv.Dense` (which
sees the bias, unlike the ``dot_general`` hook): on CPU its forward is diffjax's own threaded product with
the bias in its accumulators (``csrc/dense.cc``), its VJP the same as :func:`dense_product`'s plus the
bias gradient. ``experiments/bench_sampling_kernels.py`` times it at 1.7-1.85x XLA's dot plus bias at
guided sampling's token shapes; ``experiments/bench_dense_grad.py`` at 0.7-2.9x across the U-Net's dense
and 1x1 shapes in its committed run (per-call timings of these sub-millisecond products scatter from
run to run on a shared 2-core machine: its 16 x 784 x 96 row gave 0.67x, 0.69x and 1.29x in three runs).

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

__all__ = ["BACKWARD_MIN_ROWS", "dense_bias", "dense_bias_covers", "dot_general"]

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
  # a new callable per trace: platform_dependent caches its branches' traces, and _onednn_grads reads
  # the thread count when traced
  return lax.platform_dependent(x, w, dy, cpu=functools.partial(_onednn_grads), default=_plain_grads)


dense_product.defvjp(_fwd, _bwd)


def _plain_dense(x, w, b):
  return _plain(x, w) + b


def _dense_forward(x, w, b):
  native = functools.partial(onednn_conv.native_dense, threads=cpu_kernels.threads())
  return lax.platform_dependent(x, w, b, cpu=native, default=_plain_dense)


@jax.custom_vjp
def dense_bias(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """``x[..., C] @ w[C, O] + b[O]`` for float32 operands that :func:`dense_bias_covers`; the native
  forward on CPU, XLA's dot plus bias elsewhere (module docstring). Raises ``ValueError`` naming the
  argument whose shape does not fit."""
  _check_dense(x, w, b)
  return _dense_forward(x, w, b)


def _check_dense(x, w, b) -> None:
  if jnp.ndim(x) < 1 or jnp.ndim(w) != 2 or jnp.shape(x)[-1] != jnp.shape(w)[0]:
    raise ValueError(f"x must be [..., C] and w [C, O]; got shapes {jnp.shape(x)} and {jnp.shape(w)}")
  if jnp.shape(b) != (jnp.shape(w)[1],):
    raise ValueError(f"b must be [O] = [{jnp.shape(w)[1]}] for w of shape {jnp.shape(w)}, got {jnp.shape(b)}")


def _bias_fwd(x, w, b):
  _check_dense(x, w, b)
  return _dense_forward(x, w, b), (x, w)


def _bias_bwd(res, dy):
  dx, dw = _bwd(res, dy)
  return dx, dw, jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


dense_bias.defvjp(_bias_fwd, _bias_bwd)


def dense_bias_covers(x, w, b) -> bool:
  """Whether :func:`dense_bias` takes these operands: float32 ``x`` of rank >= 3 with no empty axis,
  ``w[C, O]``, ``b[O]``, and :func:`diffjax.cpu_kernels.enabled`."""
  return (
    jnp.ndim(x) >= 3
    and jnp.ndim(w) == 2
    and jnp.shape(b) == (jnp.shape(w)[1],)
    and jnp.shape(x)[-1] == jnp.shape(w)[0]
    and all(jnp.result_type(a) == jnp.float32 for a in (x, w, b))
    and 0 not in jnp.shape(x)
    and 0 not in jnp.shape(w)
    and cpu_kernels.enabled()
  )


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
