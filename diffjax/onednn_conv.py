"""2-D convolutions on XLA:CPU through oneDNN custom calls, with a hand-written VJP.

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (Flax's
``nn.Conv(conv_general_dilated=...)`` hook, used by :func:`diffjax.models.conv.conv`). It takes the
oneDNN path of :mod:`diffjax.cpu_kernels` (``csrc/onednn_conv.cc``) for float32 NHWC/HWIO convolutions
without dilation or groups when those kernels are enabled, and XLA's convolution for everything else.
The path is chosen per platform inside the computation (``jax.lax.platform_dependent``): on GPU and
TPU the same function lowers to XLA's convolution. The VJP calls oneDNN's backward-data and
backward-weights primitives on CPU (XLA's transposed convolutions elsewhere). The U-Net's 3x3
stride-1 "SAME" convolutions (forward and input gradient) run Winograd's F(4x4, 3x3) or F(2x2, 3x3)
instead (:func:`winograd_tile`; 4x or 2.25x fewer multiply-adds than the direct method), with the
kernel transform a call of its own (:func:`winograd_weights`) that XLA hoists out of sampling loops.
1x1 stride-1 convolutions without padding run their forward as the native dense product (``csrc/dense.cc``).
Forward and gradients equal XLA's to 1e-5 (``tests/test_onednn_conv.py``).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import cpu_kernels

__all__ = [
  "WINOGRAD_ENV",
  "conv2d_nhwc",
  "conv_general_dilated",
  "native_dense",
  "winograd_conv",
  "winograd_tile",
  "winograd_weights",
]

WINOGRAD_ENV = "DIFFJAX_CPU_WINOGRAD"

TARGETS = {
  "fwd": "DiffjaxOnednnConvFwd",
  "bwd_data": "DiffjaxOnednnConvBwdData",
  "bwd_weights": "DiffjaxOnednnConvBwdWeights",
}
WINOGRAD_TARGET = "DiffjaxWinogradConv3x3"
_SAME_3X3 = ((1, 1), (1, 1))
_VALID = ((0, 0), (0, 0))
_NHWC = ("NHWC", "HWIO", "NHWC")


def _attrs(strides, padding) -> dict:
  (pt, pb), (pl, pr) = padding
  values = (*strides, pt, pb, pl, pr, cpu_kernels.threads())
  return {k: np.int64(v) for k, v in zip(("sh", "sw", "pt", "pb", "pl", "pr", "threads"), values)}


def _out_hw(in_hw, kernel_hw, strides, padding) -> tuple[int, int]:
  return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding))


def _call(which: str, shape, a, b, strides, padding):
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(TARGETS[which], out, vmap_method="sequential")(a, b, **_attrs(strides, padding))


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _check(x, w, strides, padding) -> None:
  """Clear errors for what the oneDNN kernels cannot take (they would otherwise read out of bounds)."""
  if jnp.ndim(x) != 4 or jnp.ndim(w) != 4:
    raise ValueError(
      f"x must be [N, H, W, C] and w [KH, KW, C, O]; got shapes {jnp.shape(x)} and {jnp.shape(w)}"
    )
  if x.shape[3] != w.shape[2]:
    raise ValueError(f"x has {x.shape[3]} channels but w expects {w.shape[2]} (w shape {w.shape})")
  if len(strides) != 2 or any(int(st) < 1 for st in strides):
    raise ValueError(f"strides must be two positive integers, got {strides!r}")
  if len(padding) != 2 or any(len(pair) != 2 or min(pair) < 0 for pair in padding):
    raise ValueError(f"padding must be two (low, high) pairs of non-negative integers, got {padding!r}")
  if any(n < 1 for n in _out_hw(x.shape[1:3], w.shape[:2], strides, padding)):
    raise ValueError(
      f"kernel {w.shape[:2]} is larger than the padded input {x.shape[1:3]} (padding {padding!r})"
    )


def winograd_tile(x_shape, w_shape, strides, padding) -> int:
  """The output tile m of the Winograd F(m x m, 3x3) the CPU path uses for this convolution; 0: none.

  Winograd (``csrc/winograd_conv.cc``) takes 3x3 kernels with stride 1 and padding 1 (the U-Net's
  "SAME" convolutions) whose output channels are a multiple of 16 (the vector width of its matrix
  products) on maps of at least 16 positions, unless ``DIFFJAX_CPU_WINOGRAD=0``; everything else runs
  oneDNN's direct convolution. F(4x4) takes 4x fewer multiply-adds than the direct method, F(2x2) 2.25x,
  but F(4x4) rounds more, the more so the more input channels (``experiments/bench_winograd.py``: about
  5e-6 of the output's scale at 32 channels, 9e-6 at 96, against F(2x2)'s 7e-7), and its heavier
  transforms and 2.25x larger transformed kernel pay less on small maps. That benchmark sets the rule:
  F(4x4) on maps of at least 12x12 with at most 96 input channels (in its committed run 1.6-2.1x the
  direct kernel's speed per call, F(2x2) 1.4-1.7x), F(2x2) on smaller maps down to 4x4 (there, per call
  at batch 16: F(2x2) 1.3-1.5x on 8x8 maps, 1.0-1.2x on 4x4 maps; with the transformed kernel computed
  before a sampling loop: 1.5-1.7x and 1.6-1.65x). In its timing of the whole 8x8x1 sampler, the
  alternatives for the small maps ran at 0.88x (direct on 4x4 maps), 0.92x (F(4x4) on 4x4 maps) and
  1.02x (F(4x4) on 8x8 and 4x4 maps) of this rule's speed.
  """
  flag = os.environ.get(WINOGRAD_ENV, "1")
  if flag not in ("0", "1"):
    raise ValueError(f"{WINOGRAD_ENV} must be 0 or 1, got {flag!r}")
  if len(x_shape) != 4 or len(w_shape) != 4:
    raise ValueError(f"x_shape must be [N, H, W, C] and w_shape [KH, KW, C, O]; got {x_shape} and {w_shape}")
  _, h, w, c = x_shape
  if (
    flag == "0"
    or tuple(w_shape[:2]) != (3, 3)
    or tuple(strides) != (1, 1)
    or tuple(map(tuple, padding)) != _SAME_3X3
    or w_shape[3] % 16 != 0
    or h * w < 16
  ):
    return 0
  return 4 if min(h, w) >= 12 and c <= 96 else 2


WINOGRAD_WEIGHTS_TARGET = "DiffjaxWinogradWeights"


def winograd_weights(w, tile: int):
  """The transformed kernel ``u[a, a, C, O] = G w G^T`` (a = tile + 2) the Winograd kernel consumes; CPU.

  Its own custom call rather than part of the convolution's: when ``w`` does not change inside a loop
  (the weights in a sampler's ``fori_loop``), XLA's loop-invariant code motion runs it once before the
  loop instead of once per step and layer (``experiments/bench_winograd.py`` times both ways).
  """
  if tile not in (2, 4):
    raise ValueError(f"tile must be 2 or 4, got {tile!r}")
  if jnp.ndim(w) != 4 or tuple(w.shape[:2]) != (3, 3):
    raise ValueError(f"w must be [3, 3, C, O], got shape {jnp.shape(w)}")
  out = jax.ShapeDtypeStruct((tile + 2, tile + 2, *w.shape[2:]), jnp.float32)
  return jax.ffi.ffi_call(WINOGRAD_WEIGHTS_TARGET, out, vmap_method="sequential")(w, tile=np.int64(tile))


def winograd_conv(x, u, tile: int):
  """The Winograd custom call on pre-transformed weights ``u`` (:func:`winograd_weights`); CPU only.

  ``x[N, H, W, C]`` is convolved with the 3x3 kernel whose transform is ``u[tile + 2, tile + 2, C, O]``
  (stride 1, zero padding 1). Raises ``ValueError`` naming the argument for another tile or shapes that
  do not fit.
  """
  if tile not in (2, 4):
    raise ValueError(f"tile must be 2 or 4, got {tile!r}")
  if jnp.ndim(x) != 4:
    raise ValueError(f"x must be [N, H, W, C], got shape {jnp.shape(x)}")
  if jnp.ndim(u) != 4 or tuple(u.shape[:3]) != (tile + 2, tile + 2, x.shape[3]):
    raise ValueError(
      f"u must be [{tile + 2}, {tile + 2}, C, O] with C = {x.shape[3]} (x's channels) for tile {tile}, "
      f"got shape {jnp.shape(u)}"
    )
  out = jax.ShapeDtypeStruct((*x.shape[:3], u.shape[3]), jnp.float32)
  return jax.ffi.ffi_call(WINOGRAD_TARGET, out, vmap_method="sequential")(
    x, u, tile=np.int64(tile), threads=np.int64(cpu_kernels.threads())
  )


def _winograd(x, w, tile: int):
  return winograd_conv(x, winograd_weights(w, tile), tile)


def _is_pointwise(w_shape, strides, padding) -> bool:
  """A 1x1 kernel with stride 1 and no padding: a dense layer over the pixels."""
  return tuple(w_shape[:2]) == (1, 1) and tuple(strides) == (1, 1) and tuple(map(tuple, padding)) == _VALID


DENSE_TARGET = "DiffjaxDense"


def native_dense(x, w, b, threads: int):
  """``x[..., C] @ w[C, O] + b[O]`` by ``csrc/dense.cc`` (CPU only), the bias inside the product; the
  product of :func:`diffjax.onednn_dense.dense_bias` and of the 1x1 convolutions' forward here.

  ``threads`` is bound by callers when they trace: ``platform_dependent`` caches its branches' traces.
  """
  out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(DENSE_TARGET, out, vmap_method="sequential")(x, w, b, threads=np.int64(threads))


def _pointwise(x, w, threads: int):
  """The forward of a 1x1 convolution as a dense layer over the pixels (nn.Conv adds the bias after
  it); ``experiments/bench_dense_grad.py`` times it against oneDNN's 1x1 forward and XLA's dot at the
  U-Net's shortcut shapes."""
  return native_dense(x, w[0, 0], jnp.zeros((w.shape[3],), jnp.float32), threads)


def _forward(x, w, strides, padding):
  _check(x, w, strides, padding)
  n, h, wd, _ = x.shape
  oh, ow = _out_hw((h, wd), w.shape[:2], strides, padding)
  onednn = functools.partial(_call, "fwd", (n, oh, ow, w.shape[3]), strides=strides, padding=padding)
  tile = winograd_tile(x.shape, w.shape, strides, padding)
  if tile:
    onednn = functools.partial(_winograd, tile=tile)
  elif _is_pointwise(w.shape, strides, padding):
    onednn = functools.partial(_pointwise, threads=cpu_kernels.threads())
  xla = functools.partial(_xla_conv, strides=strides, padding=padding)
  return lax.platform_dependent(x, w, cpu=onednn, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_nhwc(x, w, strides, padding):
  """Float32 convolution ``x[N,H,W,C] * w[KH,KW,C,O]`` with integer ``strides`` and ``padding`` pairs.

  Raises ``ValueError`` naming the argument for mismatched ranks or channels, non-positive strides,
  negative padding, or a kernel larger than the padded input.

  oneDNN on CPU, XLA's convolution elsewhere; the VJP calls oneDNN's backward-data and backward-weights
  primitives on CPU and XLA's transposed convolutions elsewhere.
  """
  return _forward(x, w, strides, padding)


def _vjp_fwd(x, w, strides, padding):
  return _forward(x, w, strides, padding), (x, w)


def _vjp_bwd(strides, padding, res, dy):
  x, w = res

  def xla_dx(dy, w):
    return jax.vjp(lambda a: _xla_conv(a, w, strides, padding), x)[1](dy)[0]

  def xla_dw(x, dy):
    return jax.vjp(lambda k: _xla_conv(x, k, strides, padding), w)[1](dy)[0]

  onednn_dx = functools.partial(_call, "bwd_data", x.shape, strides=strides, padding=padding)
  tile = winograd_tile(dy.shape, (*w.shape[:2], w.shape[3], w.shape[2]), strides, padding)
  if tile:  # dx = dy * w rotated 180 degrees, in/out channels swapped
    onednn_dx = lambda dy, w: _winograd(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), tile)
  onednn_dw = functools.partial(_call, "bwd_weights", w.shape, strides=strides, padding=padding)
  dx = lax.platform_dependent(dy, w, cpu=onednn_dx, default=xla_dx)
  dw = lax.platform_dependent(x, dy, cpu=onednn_dw, default=xla_dw)
  return dx, dw


conv2d_nhwc.defvjp(_vjp_fwd, _vjp_bwd)


def _nhwc_numbers(lhs, rhs, dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


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
  """``jax.lax.conv_general_dilated`` with the oneDNN path for the cases it covers (see module doc).

  Covered: rank-4 float32 operands in NHWC/HWIO layout, no input or kernel dilation, one feature and
  batch group, no non-default precision or preferred element type, non-negative padding, no empty
  dimension, and :func:`diffjax.cpu_kernels.enabled`. Anything else is passed to ``jax.lax.conv_general_dilated`` unchanged.
  """
  plain = functools.partial(
    lax.conv_general_dilated,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  if (
    jnp.ndim(lhs) != 4
    or jnp.ndim(rhs) != 4
    or jnp.result_type(lhs) != jnp.float32
    or jnp.result_type(rhs) != jnp.float32
    or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    or feature_group_count != 1
    or batch_group_count != 1
    or precision is not None
    or preferred_element_type not in (None, jnp.float32)
    or not _nhwc_numbers(lhs, rhs, dimension_numbers)
    or 0 in lhs.shape
    or 0 in rhs.shape
  ):
    return plain()
  pads = (
    lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    if isinstance(padding, str)
    else padding
  )
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(p < 0 for pair in pads for p in pair) or not cpu_kernels.enabled():
    return plain()
  return conv2d_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads)
