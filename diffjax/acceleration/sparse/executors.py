"""Three ways to run one network description: record a dense pass, replay it sparsely, or replay it densely.

A model's "sparse twin" (e.g. :func:`diffjax.acceleration.sparse.unet.unet_forward`) is written once
against the small set of operations below and reads the model's own parameter tree. The executor decides
what the operations do (SIGE, Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional
GANs and Diffusion Models"):

* :class:`RecordExecutor` runs the dense network and records, under each name, every materialised
  feature map and every GroupNorm's per-example scale and shift (the cache of the original).
* :class:`SparseExecutor` replays it on an edited input: at every level the plan marks sparse, convolutions
  gather the active tiles' input windows (with halo), run as VALID convolutions on the stack, and a
  materialised feature is its new tiles over its cached map (read window by window, so that no full map
  is copied; only layers that need every position scatter the tiles into a copy); GroupNorm is the cached
  per-channel affine map (it commutes with gathering); attention projects only the active tokens,
  scatters keys and values into the cached ones and lets the active queries attend densely over all
  positions. Dense levels run whole, also with the cached statistics.
* :class:`MaskedDenseExecutor` is the same function computed densely: every operation on full maps and
  every materialised map ``where(active tiles, new, cached)``. The sparse executor must equal it to float
  rounding; tests use it to check the gathers, halos, strides and upsampling windows.

Features are :class:`Feat` values: ``stack`` holds the tile interiors ``[B * N, b, b, C]`` at a sparse
level (the whole ``[B, H, W, C]`` map otherwise), ``full`` the materialised map when there is one and
``cached`` the cache entry under it. A cache may hold one run (``[B, ...]`` entries) or a stack of runs
(``[S, B, ...]``, e.g. one per sampler step), read at ``slot``.
Every linear operation adds ``(name, level, multiply-accumulates)`` for the pixels it actually computes to
``executor.macs``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from diffjax.acceleration.sparse.gather import conv_windows, gather_windows, scatter, tile_grid, tile_pixels
from diffjax.acceleration.sparse.plan import SparsePlan
from diffjax.models.attention import resolve_attention_fn

__all__ = ["Feat", "MaskedDenseExecutor", "RecordExecutor", "SparseExecutor"]

_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass
class Feat:
  """A feature map at ``level``: tile interiors (or the whole map) in ``stack``, the map in ``full``, or
  the new tiles over the ``cached`` map."""

  level: int
  stack: jnp.ndarray | None = None
  full: jnp.ndarray | None = None
  cached: jnp.ndarray | None = None


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

  def __init__(self, *, attention_impl: str = "auto", slot=None):
    self.macs: list[tuple[str, int]] = []
    self.attend_fn = resolve_attention_fn(attention_impl)
    self.slot = slot

  def _at_slot(self, a: jnp.ndarray) -> jnp.ndarray:
    return a if self.slot is None else a[self.slot]

  def full(self, f: Feat) -> jnp.ndarray:
    """The whole map of a materialised feature."""
    return self._full_of(f)

  def count(self, name: str, macs: int, level: int | None = None) -> None:
    """Adds ``(name, level, macs)`` to ``self.macs`` (``level`` None for per-example dense layers)."""
    self.macs.append((name, level, int(macs)))

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

  def _dense_conv(self, name, p, srcs, *, norms, act, stride, upsample, kernel, level_out):
    pad = (kernel - 1) // 2
    xs = [_pre(self._full_of(f), None if norms is None else norms[i], act) for i, f in enumerate(srcs)]
    x = jnp.concatenate(xs, axis=-1) if len(xs) > 1 else xs[0]
    if upsample > 1:
      x = jnp.repeat(jnp.repeat(x, upsample, axis=1), upsample, axis=2)
    w = _kernel(p)
    y = lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_DN)
    y = y + p["bias"]
    b, h, wd, _ = y.shape
    self.count(name, b * h * wd * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3], level_out)
    return y

  def _full_of(self, f: Feat) -> jnp.ndarray:
    return f.full if f.full is not None else f.stack

  def conv(self, name, p, srcs, *, level_out, norms=None, act=False, stride=1, upsample=1, kernel=3) -> Feat:
    """Conv (``kernel`` 3 with padding 1, or 1) of the channel-concatenation of ``srcs``, each first
    normalised by its ``norms`` entry and passed through SiLU if ``act``; stride 2 downsamples, ``upsample``
    2 puts a nearest-neighbour upsampling in front."""
    return Feat(level_out, stack=self._dense_conv(name, p, srcs, norms=norms, act=act, stride=stride,
                                                  upsample=upsample, kernel=kernel, level_out=level_out))

  def add(self, a: Feat, b: Feat | jnp.ndarray) -> Feat:
    """``a + b`` for a feature ``b`` at the same level or a per-example channel vector ``b [B, C]``."""
    if isinstance(b, Feat):
      return Feat(a.level, stack=a.stack + self.interior(b))
    return Feat(a.level, stack=a.stack + self._per_example(a, b))

  def _per_example(self, a: Feat, v: jnp.ndarray) -> jnp.ndarray:
    return v[:, None, None, :]

  def attend(self, name, q: Feat, k: Feat, v: Feat, heads: int) -> Feat:
    """Softmax attention of the queries ``q`` over all positions of the materialised ``k`` and ``v``."""
    kf, vf = self._full_of(k), self._full_of(v)
    b, h, w, c = kf.shape
    d = c // heads
    qs = q.stack
    qt = qs.reshape(b, -1, heads, d)
    out = self.attend_fn(qt, kf.reshape(b, h * w, heads, d), vf.reshape(b, h * w, heads, d))
    self.count(name, 2 * b * qt.shape[1] * h * w * c, q.level)
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
    return self._split(self._at_slot(self.cache[name + ":scale"]), self._at_slot(self.cache[name + ":shift"]), srcs)


class MaskedDenseExecutor(_CachedStats, _DenseOps):
  """The sparse replay's function computed densely: cached statistics, and every materialised map
  new on the plan's active tiles and cached elsewhere."""

  def __init__(self, cache, plan: SparsePlan, **kw):
    super().__init__(**kw)
    self.cache, self.plan = cache, plan

  def materialize(self, name: str, f: Feat) -> Feat:
    full = jnp.where(self.plan.tile_mask(f.level)[..., None], f.stack, self._at_slot(self.cache[name]))
    return Feat(f.level, stack=full, full=full)


class SparseExecutor(_CachedStats, _DenseOps):
  """Gather-conv-scatter on the plan's active tiles (dense where the plan says so), cached statistics."""

  def __init__(self, cache, plan: SparsePlan, **kw):
    super().__init__(**kw)
    self.cache, self.plan = cache, plan
    self._memo: dict = {}

  def _memoized(self, key, fn):
    if key not in self._memo:
      self._memo[key] = fn()
    return self._memo[key]

  def _windows(self, level_out, **geometry):
    plan = self.plan
    return self._memoized(("windows", level_out, tuple(sorted(geometry.items()))), lambda: conv_windows(
      plan.tiles[level_out], block=plan.block_sizes[level_out], **geometry))

  def _grid(self, level):
    plan = self.plan
    hl, wl = plan.level_shape(level)
    b = plan.block_sizes[level]
    return self._memoized(("grid", level), lambda: tile_grid(plan.tiles[level], plan.valid[level],
                                                               grid_hw=(hl // b, wl // b)))

  def _pixels(self, level):
    plan = self.plan
    return self._memoized(("pixels", level), lambda: tile_pixels(
      plan.tiles[level], plan.valid[level], block=plan.block_sizes[level], hw=plan.level_shape(level)))

  def _tile_stack(self, level, a):
    """Repeats a per-example ``[B, ...]`` array for every tile: ``[B * N, ...]``."""
    return jnp.repeat(a, self.plan.tiles[level].shape[1], axis=0)

  def _full_of(self, f: Feat) -> jnp.ndarray:
    if f.full is None and f.cached is not None:  # a layer needs every position: write the tiles in
      f.full = scatter(self._at_slot(f.cached), f.stack, self._pixels(f.level))
    return super()._full_of(f)

  def _gather(self, f: Feat, w) -> jnp.ndarray:
    if f.full is not None or f.cached is None:
      return gather_windows(w, full=self._full_of(f))
    return gather_windows(w, stack=f.stack, cached=f.cached, grid=self._grid(f.level),
                          block=self.plan.block_sizes[f.level], slot=self.slot)

  def interior(self, f: Feat) -> jnp.ndarray:
    if f.stack is not None or not self.plan.is_sparse(f.level):
      return super().interior(f)
    return self._gather(f, self._windows(f.level, conv_hw=self.plan.level_shape(f.level), kernel=1, pad=0))

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
      win = self._windows(level_out, conv_hw=(hl * stride, wl * stride), kernel=kernel, stride=stride,
                          pad=(kernel - 1) // 2, upsample=upsample)
      xs = [self._gather(f, win) for f in srcs]
      valid = win.valid
    if norms is not None or act:
      xs = [_pre(x, None if norms is None else tuple(self._tile_stack(level_out, a) for a in norms[i]), act)
            for i, x in enumerate(xs)]
    x = jnp.concatenate(xs, axis=-1) if len(xs) > 1 else xs[0]
    if valid is not None:
      x = x * valid
    y = lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_DN) + p["bias"]
    m, b, _, _ = y.shape
    self.count(name, m * b * b * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3], level_out)
    return Feat(level_out, stack=y)

  def _per_example(self, a: Feat, v: jnp.ndarray) -> jnp.ndarray:
    if not self.plan.is_sparse(a.level):
      return v[:, None, None, :]
    return self._tile_stack(a.level, v)[:, None, None, :]

  def materialize(self, name: str, f: Feat) -> Feat:
    if not self.plan.is_sparse(f.level):
      return Feat(f.level, stack=f.stack, full=f.stack)
    return Feat(f.level, stack=f.stack, cached=self.cache[name])
