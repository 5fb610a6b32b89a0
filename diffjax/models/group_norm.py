"""GroupNorm (optionally fused with SiLU) in a per-channel formulation with a hand-written VJP.

Flax's ``nn.GroupNorm`` reshapes ``[B, H, W, C]`` to ``[B, H, W, G, C/G]`` and reduces over three
non-adjacent axes. XLA:CPU evaluates those reductions (and the ones autodiff derives for the backward
pass) with poor vectorisation at U-Net shapes. :func:`group_norm` computes the same function as

* per-channel sums over the spatial axes (a reduction over leading axes with ``C`` contiguous,
  which vectorises over channels), combined into group statistics on tiny ``[B, C]`` arrays;
* the normalisation as one per-``(b, c)`` affine map ``x * a + d`` (optionally followed by SiLU);
* a backward pass (Wu & He 2018, "Group Normalization", differentiated by hand) that needs one
  fused reduction pass over ``x`` and the cotangent, then one elementwise pass; only ``x`` and the
  ``[B, G]`` statistics are saved (autodiff of the Flax form saves the normalised activations too).

On the CPU backend, float32 inputs take diffjax's native kernels when enabled
(:mod:`diffjax.cpu_kernels`, ``csrc/group_norm.cc``: the same math per image, while its slice is in
cache), chosen inside the computation with ``jax.lax.platform_dependent``.

The variance is the two-pass (centred) form, as in ``nn.GroupNorm(use_fast_variance=False)``, and
statistics are float32 whatever the input dtype. Forward values and gradients agree with
``nn.GroupNorm`` (+ ``nn.silu``) to float32 rounding; :class:`GroupNorm` has the same parameters
(``scale``, ``bias``) so weights are interchangeable. Like every ``jax.custom_vjp`` function it
supports reverse-mode autodiff (also nested), ``vmap`` and ``jit``, not forward-mode (``jax.jvp``):
use the ``"xla"`` implementation there.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import cpu_kernels

__all__ = ["NORM_IMPLS", "GroupNorm", "group_norm", "resolve_norm_impl"]

NORM_IMPLS = ("auto", "xla", "fused")


def resolve_norm_impl(impl: str) -> str:
  """``"xla"`` or ``"fused"`` for an ``norm_impl`` name (``"auto"``: fused on the CPU backend).

  Raises:
      ValueError: If ``impl`` is not one of :data:`NORM_IMPLS`.
  """
  if impl not in NORM_IMPLS:
    raise ValueError(f"norm_impl={impl!r} is not one of {NORM_IMPLS}")
  if impl == "auto":
    return "fused" if jax.default_backend() == "cpu" else "xla"
  return impl


def _spatial_sum(a: jnp.ndarray) -> jnp.ndarray:
  """``[B, ..., C]`` -> ``[B, C]`` sum over the middle axes."""
  return jnp.sum(a, axis=tuple(range(1, a.ndim - 1)))


def _per_channel(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """``[B, C]`` -> broadcastable against ``x`` ``[B, ..., C]``."""
  return a.reshape(a.shape[0], *([1] * (x.ndim - 2)), a.shape[1])


def _group_sum(a: jnp.ndarray, groups: int) -> jnp.ndarray:
  """``[B, C]`` -> ``[B, G]`` sum over the channels of each group."""
  return a.reshape(a.shape[0], groups, -1).sum(-1)


def _to_channels(a: jnp.ndarray, channels: int) -> jnp.ndarray:
  """``[B, G]`` -> ``[B, C]`` (each group's value repeated over its channels)."""
  return jnp.repeat(a, channels // a.shape[1], axis=1)


def _stats(x: jnp.ndarray, groups: int, eps: float):
  """Group mean and reciprocal standard deviation ``[B, G]`` (float32, two-pass variance)."""
  xf = x.astype(jnp.float32)
  c = x.shape[-1]
  n = xf.size // (x.shape[0] * groups)
  mean = _group_sum(_spatial_sum(xf), groups) / n
  centred = xf - _per_channel(_to_channels(mean, c), x)
  var = _group_sum(_spatial_sum(jnp.square(centred)), groups) / n
  return mean, jax.lax.rsqrt(var + eps)


def _affine(x, mean, rstd, scale, bias):
  """Per-``(b, c)`` coefficients ``a, d`` ``[B, C]`` with ``norm(x) * scale + bias = x * a + d``."""
  c = x.shape[-1]
  a = _to_channels(rstd, c) * scale.astype(jnp.float32)[None]
  d = bias.astype(jnp.float32)[None] - _to_channels(mean, c) * a
  return a, d


def _xla_forward(x, scale, bias, groups, eps, silu, out_dtype):
  mean, rstd = _stats(x, groups, eps)
  a, d = _affine(x, mean, rstd, scale, bias)
  z = x.astype(jnp.float32) * _per_channel(a, x) + _per_channel(d, x)
  return (jax.nn.silu(z) if silu else z).astype(out_dtype), mean, rstd


def _native(x, scale, bias, out_dtype) -> bool:
  """Whether the native CPU kernels apply: all float32, no empty axis, and enabled."""
  dtypes = {jnp.dtype(x.dtype), jnp.dtype(scale.dtype), jnp.dtype(bias.dtype), jnp.dtype(out_dtype)}
  return dtypes == {jnp.dtype(jnp.float32)} and 0 not in x.shape and cpu_kernels.enabled()


def _forward(x, scale, bias, groups, eps, silu, out_dtype):
  xla = functools.partial(_xla_forward, groups=groups, eps=eps, silu=silu, out_dtype=out_dtype)
  if not _native(x, scale, bias, out_dtype):
    y, mean, rstd = xla(x, scale, bias)
    return y, (mean, rstd)

  def native(x, scale, bias):
    stats = jax.ShapeDtypeStruct((x.shape[0], groups), jnp.float32)
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats)
    call = jax.ffi.ffi_call("DiffjaxGroupNormFwd", out, vmap_method="sequential")
    return call(
      x,
      scale,
      bias,
      groups=np.int64(groups),
      eps=np.float32(eps),
      silu=np.int64(silu),
      threads=np.int64(cpu_kernels.threads()),
      vector=np.int64(cpu_kernels.vector_kernels()),
    )

  y, mean, rstd = jax.lax.platform_dependent(x, scale, bias, cpu=native, default=xla)
  return y, (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, groups, eps, silu, out_dtype):
  return _forward(x, scale, bias, groups, eps, silu, out_dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, silu, out_dtype):
  y, (mean, rstd) = _forward(x, scale, bias, groups, eps, silu, out_dtype)
  return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, eps, silu, out_dtype, res, g):
  x, scale, bias, mean, rstd = res
  xla = functools.partial(_xla_backward, groups, silu)
  if not _native(x, scale, bias, g.dtype):
    return xla(x, scale, bias, mean, rstd, g)

  def native(x, scale, bias, mean, rstd, g):
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, scale, bias))
    call = jax.ffi.ffi_call("DiffjaxGroupNormBwd", out, vmap_method="sequential")
    return call(
      x,
      scale,
      bias,
      mean,
      rstd,
      g,
      groups=np.int64(groups),
      silu=np.int64(silu),
      threads=np.int64(cpu_kernels.threads()),
    )

  return jax.lax.platform_dependent(x, scale, bias, mean, rstd, g, cpu=native, default=xla)


def _xla_backward(groups, silu, x, scale, bias, mean, rstd, g):
  c = x.shape[-1]
  n = x.size // (x.shape[0] * groups)
  xf, g = x.astype(jnp.float32), g.astype(jnp.float32)
  gamma = scale.astype(jnp.float32)
  if silu:  # d silu(z) / dz = s (1 + z (1 - s)) with s = sigmoid(z); z recomputed from x.
    a, d = _affine(x, mean, rstd, scale, bias)
    z = xf * _per_channel(a, x) + _per_channel(d, x)
    s = jax.nn.sigmoid(z)
    g = g * s * (1.0 + z * (1.0 - s))
  mean_c, rstd_c = _to_channels(mean, c), _to_channels(rstd, c)
  # Per (b, c): sum_s g and sum_s g * xhat (xhat = (x - mean) * rstd), in one fused pass.
  sum_g = _spatial_sum(g)
  sum_gx = _spatial_sum(g * (xf - _per_channel(mean_c, x))) * rstd_c
  d_bias = jnp.sum(sum_g, axis=0)
  d_scale = jnp.sum(sum_gx, axis=0)
  # dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = g * gamma.
  m1 = _to_channels(_group_sum(sum_g * gamma[None], groups) / n, c)
  m2 = _to_channels(_group_sum(sum_gx * gamma[None], groups) / n, c)
  p = rstd_c * gamma[None]
  q = -rstd_c * rstd_c * m2
  r = -rstd_c * m1 - mean_c * q
  dx = g * _per_channel(p, x) + xf * _per_channel(q, x) + _per_channel(r, x)
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(
  x: jnp.ndarray,
  scale: jnp.ndarray,
  bias: jnp.ndarray,
  *,
  num_groups: int,
  eps: float = 1e-5,
  silu: bool = False,
  dtype: jnp.dtype | None = None,
) -> jnp.ndarray:
  """``GroupNorm(x) * scale + bias`` (then SiLU if ``silu``) with float32 statistics and a custom VJP.

  Args:
      x: ``[B, ..., C]`` channels-last input (any number of spatial axes, at least one).
      scale: ``[C]`` per-channel scale (gamma).
      bias: ``[C]`` per-channel shift (beta).
      num_groups: Number of groups ``G``; must divide ``C``.
      eps: Variance epsilon.
      silu: Apply ``silu`` to the normalised output (fused into the same passes).
      dtype: Output dtype (``None``: ``x.dtype``); the arithmetic is float32 either way.

  Returns:
      ``[B, ..., C]`` in ``dtype``.

  Raises:
      ValueError: If ``x`` has fewer than 3 axes or ``num_groups`` does not divide ``C``, or the
          parameters do not have shape ``[C]``.

  Example:
      >>> x = jnp.arange(2 * 4 * 4.0).reshape(1, 2, 4, 4)
      >>> group_norm(x, jnp.ones(4), jnp.zeros(4), num_groups=2).shape
      (1, 2, 4, 4)
  """
  if x.ndim < 3:
    raise ValueError(f"x must be [B, ..., C] with at least one spatial axis, got shape {x.shape}")
  c = x.shape[-1]
  if num_groups < 1 or c % num_groups:
    raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the {c} channels")
  if scale.shape != (c,) or bias.shape != (c,):
    raise ValueError(f"scale and bias must have shape ({c},), got {scale.shape} and {bias.shape}")
  out_dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  return _group_norm(x, scale, bias, int(num_groups), float(eps), bool(silu), out_dtype)


class GroupNorm(nn.Module):
  """Drop-in for ``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)`` using :func:`group_norm`.

  Same parameters (``scale`` ones, ``bias`` zeros, float32) and the same function; the output has
  ``dtype`` when given (as in Flax), else the input's.

  Attributes:
      num_groups: Number of groups.
      epsilon: Variance epsilon.
      dtype: Output dtype (``None``: the input's).
      silu: Fuse a following SiLU.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None
  silu: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Normalises ``x`` ``[B, ..., C]``; returns the same shape."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(
      x, scale, bias, num_groups=self.num_groups, eps=self.epsilon, silu=self.silu, dtype=self.dtype
    )
