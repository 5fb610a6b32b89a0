"""The sparse twin of :class:`diffjax.models.UNet`: the same forward pass over the same parameter tree,
written against the operations of :mod:`diffjax.acceleration.sparse.executors`.

SIGE (Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models"):

* :func:`unet_record` is the dense model on the original input (equal to ``UNet.apply``) that also
  returns the cache: every block's output map and every GroupNorm's per-example scale and shift.
* :func:`unet_sparse` evaluates an edited input with that cache and a :class:`SparsePlan`: only the
  active tiles of every sparse level are recomputed (convolutions on gathered windows with halo, cached
  normalisation statistics, sparse attention projections with dense attention for the active queries);
  everything else comes from the cache.
* :func:`unet_masked_reference` is the same function computed densely, the reference the sparse path
  must equal to float rounding.

The twin is not exact with respect to the dense model on the edited input, by design of SIGE: outside the
active tiles the original's features are kept (an edit's influence beyond the dilated mask is cut), and
normalisation uses the original's statistics. ``experiments/sparse_edit.py`` measures that gap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax.acceleration.sparse.executors import Feat, MaskedDenseExecutor, RecordExecutor, SparseExecutor
from diffjax.acceleration.sparse.plan import SparsePlan
from diffjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffjax.models.unet import UNet

__all__ = ["unet_forward", "unet_macs", "unet_masked_reference", "unet_record", "unet_sparse"]


def _check(unet: UNet) -> None:
  if not isinstance(unet, UNet):
    raise ValueError(f"unet must be a diffjax.models.UNet, got {type(unet).__name__}")
  if unet.guidance_embedding:
    raise ValueError("sparse execution does not support guidance_embedding=True")
  if jnp.dtype(unet.dtype) != jnp.float32:
    raise ValueError(f"sparse execution runs in float32, got unet.dtype={jnp.dtype(unet.dtype)}")


def _resnet(ex, p, path, srcs, temb, *, level, gn):
  n1 = ex.norm(f"{path}/norm1", p["norm1"], srcs, **gn)
  h = ex.conv(f"{path}/conv1", p["conv1"], srcs, level_out=level, norms=n1, act=True)
  tp = p["time_emb_proj"]
  t = jax.nn.silu(temb) @ tp["kernel"] + tp["bias"]
  ex.count(f"{path}/time_emb_proj", tp["kernel"].size * temb.shape[0])
  h = ex.materialize(f"{path}/conv1", ex.add(h, t))
  n2 = ex.norm(f"{path}/norm2", p["norm2"], [h], **gn)
  h = ex.conv(f"{path}/conv2", p["conv2"], [h], level_out=level, norms=n2, act=True)
  if "conv_shortcut" in p:
    short = ex.conv(f"{path}/conv_shortcut", p["conv_shortcut"], srcs, level_out=level, kernel=1)
  elif len(srcs) == 1:
    short = srcs[0]
  else:  # pragma: no cover - a concatenated input always changes the channel count
    raise ValueError(f"{path}: concatenated input without conv_shortcut")
  return ex.materialize(path, ex.add(h, short))


def _attention(ex, p, path, x: Feat, *, head_dim, gn):
  s = ex.norm(f"{path}/group_norm", p["group_norm"], [x], **gn)
  names = ("to_q", "to_k", "to_v")
  qkv = {
    "kernel": jnp.concatenate([p[n]["kernel"] for n in names], axis=1),
    "bias": jnp.concatenate([p[n]["bias"] for n in names]),
  }
  y = ex.conv(f"{path}/to_qkv", qkv, [x], level_out=x.level, norms=s, kernel=1).stack
  q, k, v = jnp.split(y, 3, axis=-1)
  k = ex.materialize(f"{path}/to_k", Feat(x.level, stack=k))
  v = ex.materialize(f"{path}/to_v", Feat(x.level, stack=v))
  heads = q.shape[-1] // head_dim
  o = ex.attend(f"{path}/attention", Feat(x.level, stack=q), k, v, heads)
  o = ex.conv(f"{path}/to_out_0", p["to_out_0"], [o], level_out=x.level, kernel=1)
  return ex.materialize(path, ex.add(o, x))


def unet_forward(ex, unet: UNet, params, x, t, label=None) -> jnp.ndarray:
  """The U-Net's forward pass on executor ``ex`` (mirrors ``UNet.__call__`` block by block).

  Args:
      ex: a :class:`RecordExecutor`, :class:`SparseExecutor` or :class:`MaskedDenseExecutor`.
      unet: the module (its attributes give the architecture).
      params: its parameter tree (``variables["params"]``).
      x: ``[B, H, W, in_channels]``.
      t: ``[B]`` or scalar timesteps.
      label: ``[B]`` int labels or ``None`` (the null class on a conditional model).

  Returns:
      ``[B, H, W, out_channels]``.
  """
  _check(unet)
  unet._check_config()
  x, t, label = unet._check_inputs(x, t, label)
  chans = tuple(unet.block_out_channels)
  levels = len(chans)
  gn = dict(groups=unet.norm_num_groups, eps=unet.norm_eps)

  t_emb = get_timestep_embedding(t, chans[0], flip_sin_to_cos=unet.flip_sin_to_cos,
                                 downscale_freq_shift=unet.freq_shift)
  emb = TimestepEmbedding(4 * chans[0]).apply({"params": params["time_embedding"]}, t_emb)
  ex.count("time_embedding", x.shape[0] * (chans[0] * 4 * chans[0] + 16 * chans[0] ** 2))
  if unet.num_classes is not None:
    emb = emb + params["class_embedding"]["embedding"][label]

  h = ex.materialize("conv_in", ex.conv("conv_in", params["conv_in"], [ex.input(x.astype(jnp.float32))], level_out=0))
  skips = [h]
  for i in range(levels):
    p = params[f"down_blocks_{i}"]
    for j in range(unet.layers_per_block):
      h = _resnet(ex, p[f"resnets_{j}"], f"down_blocks_{i}/resnets_{j}", [h], emb, level=i, gn=gn)
      if unet.attention_levels[i]:
        h = _attention(ex, p[f"attentions_{j}"], f"down_blocks_{i}/attentions_{j}", h,
                       head_dim=unet.attention_head_dim, gn=gn)
      skips.append(h)
    if i < levels - 1:
      name = f"down_blocks_{i}/downsamplers_0"
      h = ex.materialize(name, ex.conv(f"{name}/conv", p["downsamplers_0"]["conv"], [h], level_out=i + 1, stride=2))
      skips.append(h)

  p = params["mid_block"]
  h = _resnet(ex, p["resnets_0"], "mid_block/resnets_0", [h], emb, level=levels - 1, gn=gn)
  h = _attention(ex, p["attentions_0"], "mid_block/attentions_0", h, head_dim=unet.attention_head_dim, gn=gn)
  h = _resnet(ex, p["resnets_1"], "mid_block/resnets_1", [h], emb, level=levels - 1, gn=gn)

  for i, level in enumerate(reversed(range(levels))):
    p = params[f"up_blocks_{i}"]
    for j in range(unet.layers_per_block + 1):
      h = _resnet(ex, p[f"resnets_{j}"], f"up_blocks_{i}/resnets_{j}", [h, skips.pop()], emb, level=level, gn=gn)
      if unet.attention_levels[level]:
        h = _attention(ex, p[f"attentions_{j}"], f"up_blocks_{i}/attentions_{j}", h,
                       head_dim=unet.attention_head_dim, gn=gn)
    if i < levels - 1:
      name = f"up_blocks_{i}/upsamplers_0"
      h = ex.materialize(name, ex.conv(f"{name}/conv", p["upsamplers_0"]["conv"], [h], level_out=level - 1,
                                       upsample=2))

  n = ex.norm("conv_norm_out", params["conv_norm_out"], [h], **gn)
  out = ex.conv("conv_out", params["conv_out"], [h], level_out=0, norms=n, act=True)
  return ex.full(ex.materialize("conv_out", out))


def unet_record(unet: UNet, params, x, t, label=None) -> tuple[jnp.ndarray, dict]:
  """Dense forward on the original input and its cache.

  Args:
      unet, params, x, t, label: as for ``unet.apply({"params": params}, x, t, label)``.

  Returns:
      ``(out, cache)``: ``out`` equals the dense model's output; ``cache`` maps names to the
      materialised feature maps ``[B, H_l, W_l, C]`` and GroupNorm scales and shifts ``[B, C]``.
  """
  _check(unet)
  ex = RecordExecutor(attention_impl=unet.attention_impl)
  out = unet_forward(ex, unet, params, x, t, label)
  return out, ex.cache


def _check_plan(plan: SparsePlan, unet: UNet, x) -> None:
  _check(unet)
  if not isinstance(plan, SparsePlan):
    raise ValueError(f"plan must be a SparsePlan, got {type(plan).__name__}")
  if plan.num_levels != len(unet.block_out_channels):
    raise ValueError(f"plan has {plan.num_levels} levels but the U-Net has {len(unet.block_out_channels)}")
  if tuple(plan.shape) != tuple(jnp.shape(x)[:3]):
    raise ValueError(f"plan was made for inputs of shape [B, H, W]={list(plan.shape)}, got x {list(jnp.shape(x))}")


def unet_sparse(unet: UNet, params, x, t, label=None, *, cache: dict, plan: SparsePlan, slot=None) -> jnp.ndarray:
  """Sparse incremental forward of an edited input ``x`` given the original's ``cache``.

  Args:
      unet, params, x, t, label: as for the dense model; ``x`` is the edited input, equal to the original
          outside the plan's mask.
      cache: from :func:`unet_record` on the original (same ``t`` and ``label``), or a stack of such caches
          (every entry with a leading axis ``S``) to be read at ``slot``.
      plan: from :func:`~diffjax.acceleration.sparse.plan.make_plan` on the edit's difference mask.
      slot: the entry of a stacked cache to use (an int, may be traced), or ``None`` for a single cache.
          Cached maps are read in place, window by window, never sliced out whole.

  Returns:
      ``[B, H, W, out_channels]``: the new output on the active tiles of level 0, the cached one elsewhere.
  """
  _check_plan(plan, unet, x)
  ex = SparseExecutor(cache, plan, attention_impl=unet.attention_impl, slot=slot)
  return unet_forward(ex, unet, params, x, t, label)


def unet_masked_reference(
  unet: UNet, params, x, t, label=None, *, cache: dict, plan: SparsePlan, slot=None
) -> jnp.ndarray:
  """What :func:`unet_sparse` computes, evaluated densely (every layer whole, then ``where(active, new,
  cached)``); a test reference, as slow as the dense model."""
  _check_plan(plan, unet, x)
  ex = MaskedDenseExecutor(cache, plan, attention_impl=unet.attention_impl, slot=slot)
  return unet_forward(ex, unet, params, x, t, label)


def unet_macs(
  unet: UNet, params, x_shape, *, plan: SparsePlan | None = None, label=None
) -> list[tuple[str, int | None, int]]:
  """Multiply-accumulates per layer, counted from the shapes each operation actually computes.

  Convolutions count ``pixels computed * k * k * C_in * C_out`` (for a sparse level: the bucket-padded
  tiles' pixels, halos excluded since they are only read), attention ``2 * queries * keys * C``, dense
  layers ``in * out`` per example. Nothing runs: the forward is traced abstractly.

  Args:
      unet, params: the model and its parameters (arrays or ``jax.ShapeDtypeStruct``s).
      x_shape: ``(B, H, W, C)``.
      plan: the edit's plan for the sparse count, or ``None`` for the dense model.
      label: optional labels (only their presence matters).

  Returns:
      ``[(name, level, macs), ...]`` in execution order; ``level`` is the resolution level of the layer's
      output (``None`` for the time embedding's dense layers).
  """
  _check(unet)
  x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((x_shape[0],), jnp.int32)
  if plan is None:
    ex = RecordExecutor(attention_impl=unet.attention_impl)
    jax.eval_shape(lambda p, x, t: unet_forward(ex, unet, p, x, t, label), params, x, t)
    return ex.macs
  _, cache = jax.eval_shape(lambda p, x, t: unet_record(unet, p, x, t, label), params, x, t)
  holder = {}

  def run(p, x, t, c, pl):
    holder["ex"] = ex = SparseExecutor(c, pl, attention_impl=unet.attention_impl)
    return unet_forward(ex, unet, p, x, t, label)

  jax.eval_shape(run, params, x, t, cache, plan)
  return holder["ex"].macs
