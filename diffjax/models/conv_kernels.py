"""2-D convolution with a blocked, matmul-based weight gradient (hand-written VJP), fast on XLA:CPU.

XLA:CPU differentiates ``lax.conv_general_dilated`` into a weight-gradient convolution whose
"kernel" is the whole ``H x W`` output cotangent: it transposes the input and the cotangent of
every convolution (two full passes over memory each) and then runs a convolution with a huge
window, which the CPU convolution kernels execute far below matrix-multiply speed. In a U-Net
training step at batch 64 these weight gradients and their transposes took about a third of the
step. :func:`conv2d` computes the same convolution with the forward pass and the input gradient
left to XLA, but the weight gradient computed as

  ``dW[(kh, kw, ci), co] = sum_n cols[n, (kh, kw, ci)] * dy[n, co]``

(im2col, Chellapilla et al. 2006, "High Performance Convolutional Neural Networks for Document
Processing") over blocks of a few images at a time (``lax.scan``): each block's ``cols`` matrix
and transposed cotangent stay in cache, and the product is one canonical matrix multiply
``dy^T [C_out, n] @ cols [n, kh*kw*C_in]`` per block. Forward values are bit-identical to
``lax.conv_general_dilated`` and gradients agree to float32 rounding.

``conv_impl="auto"`` selects it on the CPU backend only: GPUs and TPUs have fast native
weight-gradient convolutions and would only lose parallelism to the sequential scan. Like every
``jax.custom_vjp`` function it supports reverse-mode autodiff, ``vmap`` and ``jit`` but not
forward mode (``jax.jvp``); use ``conv_impl="xla"`` there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CONV_IMPLS", "conv2d", "conv_general_dilated", "resolve_conv_impl"]

CONV_IMPLS = ("auto", "xla", "blocked")
DEFAULT_BLOCK_BYTES = 4 << 20
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_conv_impl(impl: str) -> str:
  """``"xla"`` or ``"blocked"`` for a ``conv_impl`` name (``"auto"``: blocked on the CPU backend).

  Raises:
      ValueError: If ``impl`` is not one of :data:`CONV_IMPLS`.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
  if impl == "auto":
    return "blocked" if jax.default_backend() == "cpu" else "xla"
  return impl


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _im2col(xp: jnp.ndarray, kh: int, kw: int, strides, out_hw) -> jnp.ndarray:
  """Padded ``[b, Hp, Wp, C]`` -> ``[b * Ho * Wo, kh * kw * C]`` patches (rows in output order)."""
  (sh, sw), (ho, wo) = strides, out_hw
  taps = [
    xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
    for i in range(kh)
    for j in range(kw)
  ]
  cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return cols.reshape(-1, cols.shape[-1])


def _pick_chunk(n: int, item_bytes: int, block_bytes: int) -> int:
  """Largest divisor of ``n`` whose ``chunk * item_bytes`` stays within ``block_bytes`` (>= 1)."""
  c = max(1, min(n, block_bytes // max(item_bytes, 1)))
  while n % c:
    c -= 1
  return c


def _weight_grad(x, g, kernel_shape, strides, padding, block_bytes):
  """``dL/dW`` ``[kh, kw, C_in, C_out]`` from input ``x`` and output cotangent ``g`` (float32 accumulation)."""
  kh, kw, cin, cout = kernel_shape
  b, ho, wo = g.shape[:3]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  chunk = _pick_chunk(b, ho * wo * kh * kw * cin * x.dtype.itemsize, block_bytes)

  def block(xc, gc):
    cols = _im2col(xc, kh, kw, strides, (ho, wo))
    return jnp.matmul(gc.reshape(-1, cout).T, cols, preferred_element_type=jnp.float32)

  if chunk == b:
    acc = block(xp, g)
  else:
    split = lambda a: a.reshape(b // chunk, chunk, *a.shape[1:])
    acc, _ = lax.scan(
      lambda acc, xs: (acc + block(*xs), None),
      jnp.zeros((cout, kh * kw * cin), jnp.float32),
      (split(xp), split(g)),
    )
  return acc.reshape(cout, kh, kw, cin).transpose(1, 2, 3, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, block_bytes):
  return _xla_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding, block_bytes):
  return _xla_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, block_bytes, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)
  (dx,) = input_vjp(g)
  dw = _weight_grad(x, g, w.shape, strides, padding, block_bytes)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
  x: jnp.ndarray,
  kernel: jnp.ndarray,
  *,
  strides: Sequence[int] = (1, 1),
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
  impl: str = "auto",
  block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> jnp.ndarray:
  """NHWC 2-D convolution (cross-correlation, as ``torch.nn.Conv2d``) with a blocked weight gradient.

  Args:
      x: ``[B, H, W, C_in]`` input.
      kernel: ``[kh, kw, C_in, C_out]`` weights.
      strides: ``(sh, sw)``.
      padding: Explicit ``((top, bottom), (left, right))`` zero padding.
      impl: ``"blocked"`` (this module's VJP), ``"xla"`` (plain ``lax.conv_general_dilated``) or
          ``"auto"`` (blocked on CPU).
      block_bytes: Target size of one block's im2col matrix; the batch is processed in chunks of
          whole images within it.

  Returns:
      ``[B, Ho, Wo, C_out]`` with ``Ho = (H + top + bottom - kh) // sh + 1`` (likewise ``Wo``).

  Raises:
      ValueError: On mismatched ranks or channel counts.

  Example:
      >>> y = conv2d(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), padding=((1, 1), (1, 1)))
      >>> y.shape
      (2, 8, 8, 4)
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
      f"x must be [B, H, W, C] and kernel [kh, kw, C_in, C_out]; got {x.shape}, {kernel.shape}"
    )
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"x has {x.shape[-1]} channels but kernel expects C_in={kernel.shape[2]}")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if resolve_conv_impl(impl) == "xla" or kernel.shape[:2] == (1, 1):
    return _xla_conv(x, kernel, strides, padding)  # 1x1: XLA's gradient is already a plain matmul
  return _conv(x, kernel, strides, padding, int(block_bytes))


def _is_nhwc(dn) -> bool:
  """Whether conv dimension numbers are NHWC input/output with an HWIO kernel."""
  if isinstance(dn, lax.ConvDimensionNumbers):
    return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
      (0, 3, 1, 2),
      (3, 2, 0, 1),
      (0, 3, 1, 2),
    )
  return dn is not None and tuple(dn) == _NHWC


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
):
  """``lax.conv_general_dilated``-compatible entry for ``flax.linen.Conv(conv_general_dilated=...)``.

  Plain 2-D NHWC convolutions with explicit padding (what the U-Net uses) go to :func:`conv2d`
  (``impl="blocked"``); anything else (dilation, groups, string padding, other layouts) falls back to
  ``lax.conv_general_dilated`` unchanged.
  """
  plain = (
    lhs.ndim == 4
    and _is_nhwc(dimension_numbers)
    and not isinstance(padding, str)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and feature_group_count == 1
    and batch_group_count == 1
    and precision is None
    and preferred_element_type is None
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type,
    )  # fmt: skip
  return conv2d(lhs, rhs, strides=window_strides, padding=padding, impl="blocked")
