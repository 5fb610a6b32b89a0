"""Uniform quantizers as pure functions: straight-through rounding, fake quantization, range search.

A b-bit uniform quantizer maps ``x`` to ``(clip(round(x / s) + z, q_min, q_max) - z) * s`` with step
(scale) ``s`` and zero point ``z`` (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"). Conventions here:

* weights: symmetric, one scale per output channel (the last axis of a Flax kernel), ``z = 0`` and
  integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the narrow range, so that int4 packs as a signed nibble);
* activations: one scale per tensor, asymmetric (integers in ``[0, 2^b - 1]`` with a zero point) or
  symmetric; softmax outputs are unsigned with ``z = 0``.

Rounding passes gradients straight through (Bengio et al. 2013, "Estimating or Propagating Gradients
Through Stochastic Neurons"): the forward value is ``round(x)``, the derivative is 1; together with the
clip the gradient of a fake-quantized value is 1 inside the representable range and 0 outside.

Ranges are searched as in Q-Diffusion (Li et al. 2023) / BRECQ (Li et al. 2021): shrink the min/max
range by 1% steps and keep the one with the least ``L_p`` error (``p = 2.4``, LAPQ, Nahshan et al. 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "activation_range",
  "check_bits",
  "fake_quant",
  "fake_quant_weight",
  "int_range",
  "pack_int4",
  "quantize_to_int",
  "round_ste",
  "unpack_int4",
  "weight_scales",
]

MIN_SCALE = 1e-8
SEARCH_STEPS = 80
SEARCH_P = 2.4


def check_bits(bits, name: str = "bits") -> int:
  """Returns ``bits`` as an int in [2, 16] or raises a ``ValueError`` naming ``name``."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 16:
    raise ValueError(f"{name} must be an integer in [2, 16], got {bits!r}")
  return int(bits)


def int_range(bits: int, *, symmetric: bool) -> tuple[int, int]:
  """Integer range ``(q_min, q_max)``: ``(-(2^(b-1)-1), 2^(b-1)-1)`` symmetric, ``(0, 2^b - 1)`` otherwise."""
  bits = check_bits(bits)
  if symmetric:
    m = 2 ** (bits - 1) - 1
    return -m, m
  return 0, 2**bits - 1


def round_ste(x: jnp.ndarray) -> jnp.ndarray:
  """``round(x)`` forward, identity backward (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant(x: jnp.ndarray, *, scale, zero_point, q_min: int, q_max: int) -> jnp.ndarray:
  """Quantize-dequantize ``x`` with straight-through rounding.

  Args:
    x: any shape.
    scale: step ``s`` broadcastable to ``x`` (> 0).
    zero_point: ``z`` broadcastable to ``x`` (integral values; 0 for symmetric quantizers).
    q_min, q_max: integer range.

  Returns:
    ``(clip(round(x / s) + z, q_min, q_max) - z) * s`` shaped like ``x``; its gradient w.r.t. ``x``
    is 1 where ``round(x / s) + z`` lies in ``[q_min, q_max]`` and 0 elsewhere.
  """
  q = round_ste(x / scale) + zero_point
  # A select rather than jnp.clip, whose gradient is 1/2 at the bounds (and rounded values hit them).
  q = jnp.where(q < q_min, q_min, jnp.where(q > q_max, q_max, q))
  return (q - zero_point) * scale


def quantize_to_int(x: jnp.ndarray, *, scale, zero_point, q_min: int, q_max: int) -> jnp.ndarray:
  """The integers ``clip(round(x / s) + z, q_min, q_max)`` as int32 (what :func:`fake_quant` rescales)."""
  return jnp.clip(jnp.round(x / scale) + zero_point, q_min, q_max).astype(jnp.int32)


def _np_fake_quant(x, scale, zero_point, q_min, q_max):
  """:func:`fake_quant` in NumPy (no gradient), for the host-side range searches."""
  return (np.clip(np.round(x / scale) + zero_point, q_min, q_max) - zero_point) * scale


def weight_scales(kernel, bits: int, *, search: bool = True) -> np.ndarray:
  """Per-output-channel symmetric scales of a Flax kernel (output channels on the last axis).

  A host-side (NumPy) calibration helper.

  Args:
    kernel: ``[..., C_in, C_out]`` (``[kh, kw, C_in, C_out]`` for a convolution, ``[C_in, C_out]`` dense).
    bits: weight bit width.
    search: shrink each channel's ``max |w|`` in 1% steps (80 candidates) to the least ``L_2.4`` error;
      False uses ``max |w|`` itself (min-max).

  Returns:
    ``[C_out]`` float32 scales ``s_c = r_c / (2^(b-1) - 1)``.
  """
  _, q_max = int_range(bits, symmetric=True)
  w = np.asarray(kernel, np.float32).reshape(-1, np.shape(kernel)[-1])  # [N, C_out]
  absmax = np.abs(w).max(axis=0)
  if not search:
    return np.maximum(absmax / q_max, MIN_SCALE).astype(np.float32)
  best_err = np.full(absmax.shape, np.inf)
  best = np.ones_like(absmax)
  for i in range(SEARCH_STEPS):
    f = 1.0 - 0.01 * i
    s = np.maximum(absmax * f / q_max, MIN_SCALE)
    err = np.mean(np.abs(_np_fake_quant(w, s, 0.0, -q_max, q_max) - w) ** SEARCH_P, axis=0)
    better = err < best_err
    best_err = np.where(better, err, best_err)
    best = np.where(better, f, best)
  return np.maximum(absmax * best / q_max, MIN_SCALE).astype(np.float32)


def fake_quant_weight(kernel: jnp.ndarray, scale: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Symmetric per-output-channel fake quantization of ``kernel [..., C_out]`` with ``scale [C_out]``."""
  _, q_max = int_range(bits, symmetric=True)
  return fake_quant(kernel, scale=scale, zero_point=0.0, q_min=-q_max, q_max=q_max).astype(kernel.dtype)


def activation_range(
  values, *, lo, hi, bits: int, weights=None, mode: str = "asymmetric", search: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Per-tensor activation scales and zero points from observed values (host-side, NumPy).

  Args:
    values: ``[..., N]`` samples of the activation's values; leading axes are independent problems
      (e.g. one per timestep).
    lo, hi: ``[...]`` the exact minimum and maximum seen (a sample may miss the extremes).
    bits: activation bit width.
    weights: ``[..., N]`` non-negative weights of the samples in the error (default: equal). A
      stratified sample (the exact extremes with weight 1, a uniform sample of the rest with weight
      ``count / size``) makes the weighted error an estimate of the tensor's total error that sees the
      clipping of its few largest values.
    mode: "asymmetric" (range ``[min(lo, 0), max(hi, 0)]``, integers ``[0, 2^b - 1]``), "symmetric"
      (``[-max|x|, max|x|]``) or "unsigned" (``[0, hi]`` with zero point 0, for softmax outputs).
    search: shrink the range in 1% steps (80 candidates) to the least weighted ``L_2.4`` error
      (Q-Diffusion's "mse" scale method); False keeps the min-max range.

  Returns:
    ``(scale, zero_point)``, float32 arrays shaped like ``lo``.
  """
  if mode not in ("asymmetric", "symmetric", "unsigned"):
    raise ValueError(f"mode must be 'asymmetric', 'symmetric' or 'unsigned', got {mode!r}")
  q_min, q_max = int_range(bits, symmetric=mode == "symmetric")
  values = np.asarray(values, np.float32)
  weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float32)
  if weights.shape != values.shape:
    raise ValueError(f"weights have shape {weights.shape} but values have {values.shape}")
  lo = np.minimum(np.asarray(lo, np.float32), 0.0)
  hi = np.maximum(np.asarray(hi, np.float32), 0.0)
  if mode == "symmetric":
    m = np.maximum(-lo, hi)
    lo, hi = -m, m
  elif mode == "unsigned":
    lo = np.zeros_like(lo)

  def params_for(f):
    a, b = lo * f, hi * f
    if mode == "symmetric":
      s = np.maximum(b / q_max, MIN_SCALE)
      return s.astype(np.float32), np.zeros_like(s, np.float32)
    s = np.maximum((b - a) / (q_max - q_min), MIN_SCALE)
    return s.astype(np.float32), np.clip(np.round(-a / s), q_min, q_max).astype(np.float32)

  if not search:
    return params_for(np.float32(1.0))
  best_err = np.full(lo.shape, np.inf)
  best = np.ones_like(lo)
  for i in range(SEARCH_STEPS):
    f = np.float32(1.0 - 0.01 * i)
    s, z = params_for(f)
    q = _np_fake_quant(values, s[..., None], z[..., None], q_min, q_max)
    err = np.sum(weights * np.abs(q - values) ** SEARCH_P, axis=-1)
    better = err < best_err
    best_err = np.where(better, err, best_err)
    best = np.where(better, f, best)
  return params_for(best)


def pack_int4(q: np.ndarray) -> np.ndarray:
  """Packs signed 4-bit integers (values in [-8, 7]) two per byte, low nibble first.

  Args:
    q: integer array of any shape (flattened; an odd count is padded with a 0).

  Returns:
    ``uint8 [ceil(q.size / 2)]``.
  """
  q = np.asarray(q).reshape(-1).astype(np.int64)
  if q.size and (q.min() < -8 or q.max() > 7):
    raise ValueError(f"q must lie in [-8, 7] to pack as int4, got range [{q.min()}, {q.max()}]")
  if q.size % 2:
    q = np.concatenate([q, np.zeros(1, np.int64)])
  nib = (q & 0xF).astype(np.uint8)
  return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
  """Inverse of :func:`pack_int4`: ``int8 [size]`` from ``uint8 [ceil(size / 2)]``."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if packed.size != (size + 1) // 2:
    raise ValueError(f"packed has {packed.size} bytes but size={size} needs {(size + 1) // 2}")
  nib = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:size].astype(np.int16)
  return np.where(nib >= 8, nib - 16, nib).astype(np.int8)
