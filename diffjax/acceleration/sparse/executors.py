"""Three ways to run one network description: record a dense pass, replay it sparsely, or replay it densely.

A model's "sparse twin" (e.g. :func:`diffjax.acceleration.sparse.unet.unet_forward`) is written once
against the small set of operations below and reads the model's own parameter tree. The executor decides
what the operations do (SIGE, Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional
GANs and Diffusion Models"):

* :class:`RecordExecutor` runs the dense network and records, under each name, every materialised
  feature map and every GroupNorm's per-example scale and shift (the cache of the original).
* :class:`SparseExecutor` replays it on an edited input: at every level the plan marks sparse, convolutions
  gather the active tiles' input windows (with halo), run as VALID convolutions on the stack, and
  materialising a feature scatters the tiles into the cached map; GroupNorm is the cached per-channel
  affine map (it commutes with gathering); attention projects only the active tokens, scatters keys and
  values into the cached ones and lets the active queries attend densely over all positions. Dense
  levels run whole, also with the cached statistics.
* :class:`MaskedDenseExecutor` is the same function computed densely: every operation on full maps and
  every materialised map ``where(active tiles, new, cached)``. The sparse executor must equal it to float
  rounding; tests use it to check the gathers, halos, strides and upsampling windows.

Features are :class:`Feat` values: ``stack`` holds the tile interiors ``[B * N, b, b, C]`` at a sparse
level (the whole ``[B, H, W, C]`` map otherwise), ``full`` the materialised map when there is one.
Every linear operation adds its multiply-accumulate count (for the pixels it actually computes) to
``executor.macs``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from diffjax.acceleration.sparse.gather import conv_windows, gather, scatter, tile_pixels
from diffjax.acceleration.sparse.plan import SparsePlan
from diffjax.models.attention import resolve_attention_fn

__all__ = ["Feat", "MaskedDenseExecutor", "RecordExecutor", "SparseExecutor"]

_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass
class Feat:
  """A feature map at ``level``: tile interiors (or the whole map) in ``stack``, the map in ``full``."""

  level: int
  stack: jnp.ndarray | None = None
  full: jnp.ndarray | None = None


def _kernel(p) -> jnp.ndarray:
  """A Conv (``[k, k, I, O]``) or Dense (``[I, O]``) kernel as ``[k, k, I, O]``."""
  k = p["kernel"]
  return k if k.ndim == 4 else k[None, None]


def _pre(x, norm, act):
  """The cached GroupNorm (a per-example affine map, ``scale, shift [B', C]``) and SiLU in front of a conv."""
  if norm is not None:
    scale, shift = norm
    x = x * scale[:, None, None, :] + shift[:, None, None, :]
  return jax.nn.silu(x) if act else x


class _DenseOps:
  """Operations on whole maps; subclasses choose where GroupNorm statistics come from and what
  materialising a feature means."""

  def __init__(self, *, attention_impl: str = "auto"):
    self.macs: list[tuple[str, int]] = []
    self.attend_fn = resolve_attention_fn(attention_impl)

  def count(self, name: str, macs: int) -> None:
    self.macs.append((name, int(macs)))

  def input(self, x: jnp.ndarray) -> Feat:
    return Feat(0, stack=x, full=x)

  def interior(self, f: Feat) -> jnp.ndarray:
    return f.stack if f.stack is not None else f.full

  def _split(self, scale, shift, srcs):
    out, start = [], 0
    for f in srcs:
      c = f.full.shape[-1] if f.full is not None else f.stack.shape[-1]
      out.append((scale[:, start : start + c], shift[:, start : start + c]))
      start += c
    return out

  def _dense_conv(self, name, p, srcs, *, norms, act, stride, upsample, kernel):
    pad = (kernel - 1) // 2
    xs = [_pre(self._full_of(f), None if norms is None else norms[i], act) for i, f in enumerate(srcs)]
    x = jnp.concatenate(xs, axis=-1) if len(xs) > 1 else xs[0]
    if upsample > 1:
      x = jnp.repeat(jnp.repeat(x, upsample, axis=1), upsample, axis=2)
    w = _kernel(p)
    y = lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DN)
    y = y + p["bias"]
    b, h, wd, _ = y.shape
    self.count(name, b * h * wd * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3])
    return y

  def _full_of(self, f: Feat) -> jnp.ndarray:
    return f.full if f.full is not None else f.stack

  def conv(self, name, p, srcs, *, level_out, norms=None, act=False, stride=1, upsample=1, kernel=3) -> Feat:
    """Conv (``kernel`` 3 with padding 1, or 1) of the channel-concatenation of ``srcs``, each first
    normalised by its ``norms`` entry and passed through SiLU if ``act``; stride 2 downsamples, ``upsample``
    2 puts a nearest-neighbour upsampling in front."""
    return Feat(level_out, stack=self._dense_conv(name, p, srcs, norms=norms, act=act, stride=stride,
                                                  upsample=upsample, kernel=kernel))

  def add(self, a: Feat, b: Feat | jnp.ndarray) -> Feat:
    """``a + b`` for a feature ``b`` at the same level or a per-example channel vector ``b [B, C]``."""
    if isinstance(b, Feat):
      return Feat(a.level, stack=a.stack + self.interior(b))
    return Feat(a.level, stack=a.stack + self._per_example(a, b))

  def _per_example(self, a: Feat, v: jnp.ndarray) -> jnp.ndarray:
    return v[:, None, None, :]

  def attend(self, name, q: Feat, k: Feat, v: Feat, heads: int) -> Feat:
    """Softmax attention of the queries ``q`` over all positions of the materialised ``k`` and ``v``."""
    kf, vf = k.full, v.full
    b, h, w, c = kf.shape
    d = c // heads
    qs = q.stack
    qt = qs.reshape(b, -1, heads, d)
    out = self.attend_fn(qt, kf.reshape(b, h * w, heads, d), vf.reshape(b, h * w, heads, d))
    self.count(name, 2 * b * qt.shape[1] * h * w * c)
    return Feat(q.level, stack=out.reshape(qs.shape))


class RecordExecutor(_DenseOps):
  """The dense network on the original input; fills ``cache`` with every materialised map and every
  GroupNorm's ``(scale, shift)``, each ``[B, C]``."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.cache: dict[str, jnp.ndarray] = {}

  def norm(self, name, p, srcs, *, groups: int, eps: float):
    x = jnp.concatenate([self._full_of(f) for f in srcs], axis=-1).astype(jnp.float32)
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4))
    var = jnp.mean(jnp.square(xg - mean[:, None, None, :, None]), axis=(1, 2, 4))
    inv = jnp.repeat(lax.rsqrt(var + eps), c // groups, axis=1)
    scale = p["scale"] * inv
    shift = p["bias"] - jnp.repeat(mean, c // groups, axis=1) * scale
    self.cache[name + ":scale"], self.cache[name + ":shift"] = scale, shift
    return self._split(scale, shift, srcs)

  def materialize(self, name: str, f: Feat) -> Feat:
    self.cache[name] = f.stack
    return Feat(f.level, stack=f.stack, full=f.stack)


class _CachedStats:
  def norm(self, name, p, srcs, *, groups: int, eps: float):
    return self._split(self.cache[name + ":scale"], self.cache[name + ":shift"], srcs)


class MaskedDenseExecutor(_CachedStats, _DenseOps):
  """The sparse replay's function computed densely: cached statistics, and every materialised map
  new on the plan's active tiles and cached elsewhere."""

  def __init__(self, cache, plan: SparsePlan, **kw):
    super().__init__(**kw)
    self.cache, self.plan = cache, plan

  def materialize(self, name: str, f: Feat) -> Feat:
    full = jnp.where(self.plan.tile_mask(f.level)[..., None], f.stack, self.cache[name])
    return Feat(f.level, stack=full, full=full)


class SparseExecutor(_CachedStats, _DenseOps):
  """Gather-conv-scatter on the plan's active tiles (dense where the plan says so), cached statistics."""

  def __init__(self, cache, plan: SparsePlan, **kw):
    super().__init__(**kw)
    self.cache, self.plan = cache, plan
    self._memo: dict = {}

  def _windows(self, level_out, **geometry):
    key = (level_out, tuple(sorted(geometry.items())))
    if key not in self._memo:
      self._memo[key] = conv_windows(self.plan.tiles[level_out], block=self.plan.block_sizes[level_out], **geometry)
    return self._memo[key]

  def _tile_stack(self, level, a):
    """Repeats a per-example ``[B, ...]`` array for every tile: ``[B * N, ...]``."""
    return jnp.repeat(a, self.plan.tiles[level].shape[1], axis=0)

  def interior(self, f: Feat) -> jnp.ndarray:
    if f.stack is not None or not self.plan.is_sparse(f.level):
      return super().interior(f)
    idx, _, win = self._windows(f.level, conv_hw=self.plan.level_shape(f.level), kernel=1, pad=0)
    return gather(f.full, idx, win)

  def conv(self, name, p, srcs, *, level_out, norms=None, act=False, stride=1, upsample=1, kernel=3) -> Feat:
    if not self.plan.is_sparse(level_out):
      return super().conv(name, p, srcs, level_out=level_out, norms=norms, act=act, stride=stride,
                          upsample=upsample, kernel=kernel)
    w = _kernel(p)
    if kernel == 1:  # pointwise: the tile interiors are all it reads
      xs = [self.interior(f) for f in srcs]
      valid = None
    else:
      hl, wl = self.plan.level_shape(level_out)
      idx, valid, win = self._windows(level_out, conv_hw=(hl * stride, wl * stride), kernel=kernel,
                                      stride=stride, pad=(kernel - 1) // 2, upsample=upsample)
      xs = [gather(f.full, idx, win) for f in srcs]
    if norms is not None or act:
      xs = [_pre(x, None if norms is None else tuple(self._tile_stack(level_out, a) for a in norms[i]), act)
            for i, x in enumerate(xs)]
    x = jnp.concatenate(xs, axis=-1) if len(xs) > 1 else xs[0]
    if valid is not None:
      x = x * valid
    y = lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_DN) + p["bias"]
    m, b, _, _ = y.shape
    self.count(name, m * b * b * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3])
    return Feat(level_out, stack=y)

  def _per_example(self, a: Feat, v: jnp.ndarray) -> jnp.ndarray:
    if not self.plan.is_sparse(a.level):
      return v[:, None, None, :]
    return self._tile_stack(a.level, v)[:, None, None, :]

  def materialize(self, name: str, f: Feat) -> Feat:
    if not self.plan.is_sparse(f.level):
      return Feat(f.level, stack=f.stack, full=f.stack)
    plan = self.plan
    key = ("pixels", f.level)
    if key not in self._memo:
      self._memo[key] = tile_pixels(plan.tiles[f.level], plan.valid[f.level], block=plan.block_sizes[f.level],
                                    hw=plan.level_shape(f.level))
    return Feat(f.level, stack=f.stack, full=scatter(self.cache[name], f.stack, self._memo[key]))
