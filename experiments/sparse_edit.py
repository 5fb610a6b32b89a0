"""Spatially sparse incremental inference for edits (SIGE, Li et al. 2022): MACs, wall time and error.

  /work/locks/heavy python experiments/sparse_edit.py [--trained-workdir /work/assets/quant/digits_ddpm] [--reps 9]

Part 1 (random-init weights; speed and exactness do not depend on training): a 7.5M-parameter U-Net on
128x128x3 inputs (channels 64/64/128/128, two ResNets per level, attention at 32x32 and 16x16) evaluated
on a noisy image (t = 500) whose clean image was edited inside a disk covering 1%, 5%, 10% or 25% of the
image (1%, 2%, 5%, 10% and 25%). For each: the cache of the original (one dense run), the plan (active tiles per level, bucket
padded), multiply-accumulates counted per layer (dense vs gathered tiles, with and without bucket
padding), wall time of the jitted dense model vs the jitted sparse twin timed alternately in one process,
and the maximum absolute error of the sparse output against (a) the same function computed densely (the
exactness of gather/scatter, halos, strides and upsampling) and (b) the dense model on the edited input
(SIGE's approximation: features outside the active tiles and the GroupNorm statistics are the original's).

Part 2: one SDEdit edit (DDIM, 20 steps at strength 1, strength 0.5) on the same model and the 5% edit,
dense vs sparse with a cache per step, timed alternately.

Part 3 (a real edit, when ``--trained-workdir`` holds a trained class-conditional model, e.g. the 8x8
sklearn-digits DDPM or an MNIST one): strokes added to held-out digits, masked SDEdit (the paper's
Algorithm 3 with the mask = the dilated stroke; class-conditional, DDIM 50 steps, strength 0.5) of the
original and of the edited digits; the sparse edit against the same function computed densely (max abs
error) and against the dense model's edit (PSNR), and a grid ``experiments/results/<name>_trained.png``.

Writes ``experiments/results/sparse_edit.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import machine, write_results

from diffjax.acceleration.sparse import (
  SparseParams,
  difference_mask,
  level_masks,
  make_plan,
  record_sdedit,
  sparse_model_fn,
  unet_macs,
  unet_masked_reference,
  unet_record,
  unet_sparse,
)
from diffjax.editing import sdedit
from diffjax.images import save_image_grid
from diffjax.models import UNet
from diffjax.schedules import make_schedule

AREAS = (0.01, 0.02, 0.05, 0.10, 0.25)


def bench_model(smoke: bool) -> tuple[UNet, int, tuple]:
  """The benchmark U-Net, its input size and the tile size per level (``None`` = dense)."""
  if smoke:
    return UNet(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                attention_levels=(False, False, True, True), attention_head_dim=16, norm_num_groups=8), 32, (4, 2, 2, None)
  unet = UNet(in_channels=3, out_channels=3, block_out_channels=(64, 64, 128, 128), layers_per_block=2,
              attention_levels=(False, False, True, True), attention_head_dim=32, norm_num_groups=32)
  return unet, 128, (8, 4, 2, 2)


def random_params(module, *args, seed: int = 0):
  """Parameters shaped like ``module.init``'s, drawn with numpy (kernels N(0, 1/fan_in), GroupNorm scales
  1 + N(0, 0.01), biases N(0, 0.01)) without compiling ``init``."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape), jnp.float32)
    base = 1.0 if name == "scale" else 0.0
    return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def scene(size: int, seed: int) -> np.ndarray:
  """A smooth colour image in [-1, 1], ``[1, size, size, 3]`` (a sum of random Gaussian blobs)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  img = np.zeros((size, size, 3))
  for _ in range(12):
    cy, cx, s = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
    img += rng.uniform(-1, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None]
  return np.tanh(img)[None].astype(np.float32)


def disk(size: int, area: float) -> np.ndarray:
  """``[1, size, size]`` bool disk of the given area fraction, centred off the tile grid."""
  yy, xx = np.mgrid[:size, :size]
  r = np.sqrt(area * size * size / np.pi)
  return ((yy - 0.41 * size) ** 2 + (xx - 0.57 * size) ** 2 <= r * r)[None]


def alternate(fns: dict, reps: int) -> dict:
  """Times the thunks alternately (order flipped every repetition); returns the per-repetition seconds."""
  for f in fns.values():
    jax.block_until_ready(f())
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(reps):
    for n in names if r % 2 == 0 else names[::-1]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      times[n].append(time.perf_counter() - t0)
  return times


def level_sums(triples, levels: int) -> list[int]:
  return [sum(m for _, lv, m in triples if lv == level) for level in range(levels)]


def speed_inputs(unet, size) -> dict:
  """The schedule, the clean scene, its noise and noisy version at t = 500, and the random parameters."""
  schedule = make_schedule("linear", num_timesteps=1000)
  ab = float(schedule.alphas_cumprod[500])
  x0 = scene(size, 0)
  noise = np.random.default_rng(1).normal(size=x0.shape).astype(np.float32)
  x_t = jnp.asarray(np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise)
  params = random_params(unet, x_t, jnp.array([500]))
  return {"params": params, "x0": x0, "schedule": schedule, "ab": ab, "noise": noise, "x_t": x_t}


def part_speed(unet, size, blocks, reps: int) -> tuple[list, dict]:
  ctx = speed_inputs(unet, size)
  schedule, ab, x0, noise, x_t, params = (ctx[k] for k in ("schedule", "ab", "x0", "noise", "x_t", "params"))
  t = jnp.array([500])
  levels = len(unet.block_out_channels)
  dense = jax.jit(lambda p, x: unet.apply({"params": p}, x, t))
  record = jax.jit(lambda p, x: unet_record(unet, p, x, t))
  sparse = jax.jit(lambda p, x, c, pl: unet_sparse(unet, p, x, t, cache=c, plan=pl))
  reference = jax.jit(lambda p, x, c, pl: unet_masked_reference(unet, p, x, t, cache=c, plan=pl))
  out_orig, cache = record(params, x_t)
  dense_macs = unet_macs(unet, params, x_t.shape)
  total = sum(m for *_, m in dense_macs)
  rows = []
  for area in AREAS:
    load0 = os.getloadavg()[0]
    mask = disk(size, area)
    x0e = np.where(mask[..., None], np.array([0.9, -0.6, 0.2], np.float32), x0)
    x_e = jnp.asarray(np.sqrt(ab) * x0e + np.sqrt(1 - ab) * noise)
    plan = make_plan(difference_mask(x_e, x_t), block_sizes=blocks)
    sparse_macs = unet_macs(unet, params, x_t.shape, plan=plan)
    exact_macs = unet_macs(unet, params, x_t.shape, plan=make_plan(difference_mask(x_e, x_t), block_sizes=blocks,
                                                                   bucket_growth=None))
    times = alternate({"dense": lambda: dense(params, x_e), "sparse": lambda: sparse(params, x_e, cache, plan)}, reps)
    y_sparse = sparse(params, x_e, cache, plan)
    y_ref = reference(params, x_e, cache, plan)
    y_dense = dense(params, x_e)
    inside = np.asarray(plan.tile_mask(0))[..., None]
    td, ts = np.median(times["dense"]), np.median(times["sparse"])
    tiles = []
    for level in range(levels):
      b = plan.block_sizes[level]
      hl = size >> level
      if b is None:
        tiles.append({"level": level, "block": None, "active": None, "computed": None, "total": None})
      else:
        tiles.append({"level": level, "block": b, "active": int(np.asarray(plan.num_active[level]).max()),
                      "computed": int(plan.tiles[level].shape[1]), "total": (hl // b) ** 2})
    row = {
      "area_target": area,
      "area": float(mask.mean()),
      "tiles": tiles,
      "macs_dense": total,
      "macs_sparse": sum(m for *_, m in sparse_macs),
      "macs_sparse_unpadded": sum(m for *_, m in exact_macs),
      "macs_dense_per_level": level_sums(dense_macs, levels),
      "macs_sparse_per_level": level_sums(sparse_macs, levels),
      "ms_dense_median": round(1e3 * td, 2),
      "ms_sparse_median": round(1e3 * ts, 2),
      "ms_dense_all": [round(1e3 * v, 1) for v in times["dense"]],
      "ms_sparse_all": [round(1e3 * v, 1) for v in times["sparse"]],
      "speedup_median_of_pairs": float(np.median(np.array(times["dense"]) / np.array(times["sparse"]))),
      "max_abs_err_vs_dense_reference": float(jnp.max(jnp.abs(y_sparse - y_ref))),
      "max_abs_err_vs_dense_model": float(jnp.max(jnp.abs(y_sparse - y_dense))),
      "max_abs_err_vs_dense_model_in_tiles": float(np.max(np.where(inside, np.abs(y_sparse - y_dense), 0))),
      "max_abs_change_of_dense_output": float(jnp.max(jnp.abs(y_dense - out_orig))),
      "rms_err_vs_dense_model": float(jnp.sqrt(jnp.mean(jnp.square(y_sparse - y_dense)))),
      "rms_change_of_dense_output": float(jnp.sqrt(jnp.mean(jnp.square(y_dense - out_orig)))),
      "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    row["mac_reduction"] = row["macs_dense"] / row["macs_sparse"]
    row["speedup_of_medians"] = td / ts
    rows.append(row)
    print(f"area {row['area']:.3f}: MACs {row['mac_reduction']:.1f}x fewer, {td * 1e3:.0f} vs {ts * 1e3:.0f} ms "
          f"({row['speedup_median_of_pairs']:.1f}x), err vs reference {row['max_abs_err_vs_dense_reference']:.1e}, "
          f"vs dense model {row['max_abs_err_vs_dense_model']:.2e} (edit changes output by "
          f"{row['max_abs_change_of_dense_output']:.2f}), load {row['load_1min']}", flush=True)
  return rows, {"params": params, "x0": x0, "schedule": schedule}


def part_sdedit(unet, size, blocks, params, x0, schedule, reps: int) -> dict:
  kw = dict(schedule=schedule, key=jax.random.key(3), strength=0.5, num_steps=20)
  mask = disk(size, 0.05)
  guide = jnp.asarray(x0)
  edited = jnp.asarray(np.where(mask[..., None], np.array([0.9, -0.6, 0.2], np.float32), x0))
  t0 = time.perf_counter()
  x_orig, traj = jax.jit(lambda p, g: record_sdedit(unet=unet, params=p, x_guide=g, **kw))(params, guide)
  jax.block_until_ready(traj)
  record_s = time.perf_counter() - t0
  plan = make_plan(difference_mask(edited, guide), block_sizes=blocks)
  bundle = SparseParams(params, traj, plan)
  dense_fn = jax.jit(lambda p, g: sdedit(model_fn=lambda q, x, t, c: unet.apply({"params": q}, x, t), params=p,
                                          x_guide=g, **kw))
  sparse_fn = jax.jit(lambda b, g: sdedit(model_fn=sparse_model_fn(unet), params=b, x_guide=g, **kw))
  ref_fn = jax.jit(lambda b, g: sdedit(model_fn=sparse_model_fn(unet, reference=True), params=b, x_guide=g, **kw))
  load0 = os.getloadavg()[0]
  times = alternate({"dense": lambda: dense_fn(params, edited), "sparse": lambda: sparse_fn(bundle, edited)}, reps)
  y_s, y_d, y_r = sparse_fn(bundle, edited), dense_fn(params, edited), ref_fn(bundle, edited)
  td, ts = np.median(times["dense"]), np.median(times["sparse"])
  out = {
    "steps_run": int((traj.timesteps >= 0).sum()),
    "area": float(mask.mean()),
    "record_seconds_incl_compile": round(record_s, 1),
    "cache_mb_per_step": round(sum(a[0].size * 4 for a in jax.tree.leaves(traj.caches)) / 2**20, 1),
    "s_dense_median": round(td, 3),
    "s_sparse_median": round(ts, 3),
    "speedup_of_medians": td / ts,
    "max_abs_err_vs_dense_reference": float(jnp.max(jnp.abs(y_s - y_r))),
    "max_abs_err_vs_dense_sdedit": float(jnp.max(jnp.abs(y_s - y_d))),
    "max_abs_change_of_dense_sdedit": float(jnp.max(jnp.abs(y_d - x_orig))),
    "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
  }
  print(f"SDEdit: {td:.2f} vs {ts:.2f} s ({out['speedup_of_medians']:.1f}x), err vs reference "
        f"{out['max_abs_err_vs_dense_reference']:.1e}, vs dense {out['max_abs_err_vs_dense_sdedit']:.3f}", flush=True)
  return out


def psnr(a, b) -> float | None:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2); None for identical images."""
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return None if mse == 0 else float(10 * np.log10(4.0 / mse))


def part_trained(workdir: str, num: int, name: str) -> dict:
  from trained_run import load_run

  from diffjax.data.pipeline import to_model_range, to_uint8
  from diffjax.training import builders

  run = load_run(workdir)
  unet, params, schedule = run.model, run.params, run.schedule
  _, heldout = builders.load_data(run.config)
  x = to_model_range(heldout.images[:num])
  size = x.shape[1]
  rng = np.random.default_rng(0)
  edited = x.copy()
  thick, lo, hi = (1, 2, 4) if size < 16 else (2, 7, 11)
  for i in range(num):  # a short bright stroke somewhere inside the digit box
    length = int(rng.integers(lo, hi))
    y0, x0 = int(rng.integers(size // 6, size - size // 6 - thick)), int(rng.integers(size // 6, size - size // 6 - length))
    if i % 2:
      edited[i, y0 : y0 + thick, x0 : x0 + length] = 1.0
    else:
      edited[i, x0 : x0 + length, y0 : y0 + thick] = 1.0
  changed = difference_mask(edited, x)
  levels = len(unet.block_out_channels)
  blocks = (2, None) if size < 16 else (4, 2, None)
  blocks = tuple(blocks[:levels]) + (None,) * (levels - len(blocks))
  keep_free = level_masks(changed, num_levels=1, dilation=1)[0]  # Algorithm 3's mask: the stroke and 1 px around
  label = jnp.asarray(heldout.labels[:num], jnp.int32)
  kw = dict(schedule=schedule, key=jax.random.key(5), strength=0.5, num_steps=50, cond=label,
            prediction=run.config.diffusion.prediction, mask=jnp.asarray(keep_free[..., None], jnp.float32))
  x_orig, traj = jax.jit(lambda p, g: record_sdedit(unet=unet, params=p, x_guide=g, **kw))(params, jnp.asarray(x))
  plan = make_plan(difference_mask(edited, x), block_sizes=blocks)
  dense = jax.jit(lambda p, g: sdedit(model_fn=lambda q, y, t, c: unet.apply({"params": q}, y, t, c), params=p,
                                       x_guide=g, **kw))(params, jnp.asarray(edited))
  sparse = jax.jit(lambda b, g: sdedit(model_fn=sparse_model_fn(unet), params=b, x_guide=g, **kw))(
    SparseParams(params, traj, plan), jnp.asarray(edited))
  reference = jax.jit(lambda b, g: sdedit(model_fn=sparse_model_fn(unet, reference=True), params=b, x_guide=g, **kw))(
    SparseParams(params, traj, plan), jnp.asarray(edited))
  shape = (num, *run.image_shape)
  dense_m = sum(m for *_, m in unet_macs(unet, params, shape, label=label))
  sparse_m = sum(m for *_, m in unet_macs(unet, params, shape, plan=plan, label=label))
  diff = np.clip(np.abs(np.asarray(sparse) - np.asarray(dense)) * 10 - 1, -1, 1)
  cols = [x, edited, x_orig, dense, sparse, diff]
  grid = np.stack([np.asarray(c) for c in cols], axis=1).reshape(-1, *run.image_shape)
  save_image_grid(to_uint8(grid), os.path.join("experiments", "results", f"{name}_trained.png"), nrow=len(cols))
  per = [v for v in (psnr(sparse[i], dense[i]) for i in range(num)) if v is not None]
  step = run.step
  out = {
    "workdir": workdir,
    "checkpoint_step": step,
    "num_digits": num,
    "image_shape": list(run.image_shape),
    "edited_area_mean": float(changed.mean()),
    "sdedit_mask_area_mean": float(keep_free.mean()),
    "steps_run": int((traj.timesteps >= 0).sum()),
    "blocks": list(blocks),
    "mac_reduction_per_step": dense_m / sparse_m,
    "psnr_sparse_vs_dense_db_all": psnr(sparse, dense),  # over all digits together; None if identical
    "psnr_sparse_vs_dense_db_min": min(per) if per else None,
    "digits_bitwise_equal_to_dense": num - len(per),
    "max_abs_sparse_vs_dense": float(jnp.max(jnp.abs(sparse - dense))),
    "max_abs_sparse_vs_dense_reference": float(jnp.max(jnp.abs(sparse - reference))),
    "max_abs_sparse_vs_dense_outside_mask": float(jnp.max(jnp.abs(jnp.where(kw["mask"] > 0, 0, sparse - dense)))),
    "psnr_dense_edit_vs_original_sdedit_db_all": psnr(dense, x_orig),
  }
  print(f"trained: {out}", flush=True)
  return out


def _db(v) -> str:
  return "identical (PSNR infinite)" if v is None else f"{v:.1f} dB"


def markdown(result: dict) -> str:
  r = result
  lines = [
    "# sparse_edit: spatially sparse incremental inference (SIGE) for edits\n",
    f"`{r['command']}` on {r['machine']}, jax {jax.__version__}. `uptime` at start: `{r['uptime_start']}`; at "
    f"end: `{r['uptime_end']}`; 1-minute load average before/after each row "
    "in the tables (the machine is shared; speeds are ratios of dense and sparse timed alternately in one "
    "process, median of the per-repetition ratios)."
    + (" The single-evaluation rows were measured by an earlier, stopped run of the same command (resumed from "
       "its partial results; their load is in the table)." if r.get("speed_rows_resumed") else "") + "\n",
    f"Model: {r['model']['description']} ({r['model']['params_m']:.2f}M parameters, random init), input "
    f"{r['model']['input']}, tiles per level {r['model']['blocks']} (None = dense), buckets growing by sqrt(2). "
    f"Dense forward: {r['rows'][0]['macs_dense'] / 1e9:.2f} GMACs.\n",
    "## One U-Net evaluation (t = 500), edit = a disk\n",
    "| edited area | active / computed tiles per level | GMACs dense / sparse (unpadded) | MACs saved | ms dense / sparse | speed-up | max abs err vs dense reference | max abs err vs dense model (change the edit makes) | load |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in r["rows"]:
    tiles = ", ".join("dense" if t["block"] is None else f"{t['active']}/{t['computed']} of {t['total']}"
                      for t in row["tiles"])
    lines.append(
      f"| {100 * row['area']:.1f}% | {tiles} | {row['macs_dense'] / 1e9:.2f} / {row['macs_sparse'] / 1e9:.3f} "
      f"({row['macs_sparse_unpadded'] / 1e9:.3f}) | {row['mac_reduction']:.1f}x | {row['ms_dense_median']:.0f} / "
      f"{row['ms_sparse_median']:.0f} | {row['speedup_median_of_pairs']:.1f}x | "
      f"{row['max_abs_err_vs_dense_reference']:.1e} | {row['max_abs_err_vs_dense_model']:.3f} "
      f"({row['max_abs_change_of_dense_output']:.3f}) | {row['load_1min'][0]:.1f} / {row['load_1min'][1]:.1f} |"
    )
  five = next(row for row in r["rows"] if row["area_target"] == 0.05)
  lines += [
    "\nMACs per level at 5% (dense -> sparse, GMACs): " + ", ".join(
      f"level {i}: {d / 1e9:.2f} -> {s / 1e9:.3f}"
      for i, (d, s) in enumerate(zip(five["macs_dense_per_level"], five["macs_sparse_per_level"]))) + ".\n",
    "*Error vs dense reference*: the sparse output against the same function evaluated densely (every layer "
    "whole, then new values on the active tiles and cached ones elsewhere): the exactness of the gathers, "
    "halos, strided and upsampling windows and scatters. *Error vs dense model*: against the unmodified "
    "U-Net on the edited input, i.e. SIGE's approximation (outside the dilated mask the original's features "
    "are kept, GroupNorm uses the original's statistics, queries outside the mask keep their attention "
    "output); in parentheses the largest change the edit makes to the dense output.\n",
  ]
  s = r["sdedit"]
  lines += [] if s is None else [
    "## SDEdit with a cache per step\n",
    f"DDIM, 20 steps at strength 1, strength 0.5 ({s['steps_run']} steps), the {100 * s['area']:.1f}% disk "
    f"edit: dense {s['s_dense_median']:.2f} s vs sparse {s['s_sparse_median']:.2f} s per edit "
    f"(**{s['speedup_of_medians']:.1f}x**, load {s['load_1min'][0]:.1f} / {s['load_1min'][1]:.1f}); max abs "
    f"error vs the dense reference {s['max_abs_err_vs_dense_reference']:.1e}, vs the dense SDEdit "
    f"{s['max_abs_err_vs_dense_sdedit']:.3f} (the edit changes the dense result by up to "
    f"{s['max_abs_change_of_dense_sdedit']:.3f}). Recording the original's trajectory (dense, once per "
    f"image, with compilation): {s['record_seconds_incl_compile']:.0f} s; cache {s['cache_mb_per_step']:.0f} "
    "MiB per step.\n",
  ]
  m = r.get("trained")
  if m:
    hw = "x".join(str(v) for v in m["image_shape"][:2])
    lines += [
      "## A real edit on a trained model: strokes on held-out digits\n",
      f"Model: `{m['workdir']}` (checkpoint {m['checkpoint_step']}), {hw}, tiles {m['blocks']}. {m['num_digits']} "
      f"held-out digits with a stroke added ({100 * m['edited_area_mean']:.1f}% of the pixels changed), masked "
      f"SDEdit (Algorithm 3; mask = the stroke dilated by 1 px, {100 * m['sdedit_mask_area_mean']:.1f}% of the "
      f"pixels; class-conditional on the true labels; DDIM 50, strength 0.5: {m['steps_run']} steps) from the "
      f"same noise, original run recorded once. Sparse vs the same function computed densely: max abs "
      f"**{m['max_abs_sparse_vs_dense_reference']:.1e}**. Sparse vs the dense model's edit: PSNR "
      + (f"{_db(m['psnr_sparse_vs_dense_db_all'])} over all digits (lowest single digit "
         f"{_db(m['psnr_sparse_vs_dense_db_min'])}; {m['digits_bitwise_equal_to_dense']} of {m['num_digits']} digits "
         "bitwise equal to dense), max abs " if "psnr_sparse_vs_dense_db_all" in m else
         f"lowest single digit {_db(m['psnr_sparse_vs_dense_db_min'])} (some digits bitwise equal to dense), max abs ")
      + f"{m['max_abs_sparse_vs_dense']:.3f} (outside the SDEdit mask: {m['max_abs_sparse_vs_dense_outside_mask']:.1e}); "
      + (f"the edit itself moves the dense result to {_db(m['psnr_dense_edit_vs_original_sdedit_db_all'])} from the "
         "original's SDEdit. " if "psnr_dense_edit_vs_original_sdedit_db_all" in m else "")
      + f"MACs per step {m['mac_reduction_per_step']:.1f}x fewer (at {hw} the tiles and halos "
      "cover much of the image; speed is not the point here).\n",
      f"Grid `{r['name']}_trained.png`, columns: original, edited guide, SDEdit of the original (the cached run), "
      "dense SDEdit of the edit, sparse SDEdit of the edit, 10x |sparse - dense|.\n",
    ]
  lines += ["## Checks\n"] + [f"- {k}: {v}" for k, v in r["checks"].items()] + [""]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reps", type=int, default=9, help="alternating timing repetitions per area")
  p.add_argument("--sdedit-reps", type=int, default=3, help="0 skips the SDEdit timing")
  p.add_argument("--trained-workdir", default=None, help="trained class-conditional work directory (real edit)")
  p.add_argument("--trained-num", type=int, default=8)
  p.add_argument("--smoke", action="store_true", help="a tiny model, seconds (checks the script, not the claim)")
  p.add_argument("--name", default="sparse_edit")
  p.add_argument("--from-partial", action="store_true",
                 help="write the report from a stopped run's partial results (speed rows, trained part) only")
  a = p.parse_args()
  t_start = time.perf_counter()
  uptime_start = os.popen("uptime").read().strip()
  unet, size, blocks = bench_model(a.smoke)
  if a.from_partial:
    with open(os.path.join("experiments", "results", f"{a.name}.partial.json")) as f:
      saved = json.load(f)
    trained = saved.get("trained")
    if trained:  # infinite PSNRs (bitwise-equal digits) are not JSON
      trained = {k: v for k, v in trained.items() if not (isinstance(v, float) and not np.isfinite(v))}
  else:
    trained = part_trained(a.trained_workdir, a.trained_num, a.name) if a.trained_workdir else None
  partial = os.path.join("experiments", "results", f"{a.name}.partial.json")
  resumed = False
  if a.from_partial:
    rows, sd, resumed = saved["rows"], None, True
    params_m = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(
      unet.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.array([500]))["params"]))
  elif os.path.exists(partial):  # a stopped run's speed rows (same model and areas): resume after them
    with open(partial) as f:
      rows = json.load(f)["rows"]
    ctx = speed_inputs(unet, size)
    print(f"resumed {len(rows)} speed rows from {partial}", flush=True)
    resumed = True
  else:
    rows, ctx = part_speed(unet, size, blocks, a.reps)
    with open(partial, "w") as f:  # a crash below keeps these
      json.dump({"rows": rows, "args": vars(a)}, f, indent=2)
  if not a.from_partial:
    params_m = sum(x.size for x in jax.tree.leaves(ctx["params"]))
    sd = part_sdedit(unet, size, blocks, ctx["params"], ctx["x0"], ctx["schedule"], a.sdedit_reps) if a.sdedit_reps else None
  small = [row for row in rows if row["area_target"] <= 0.05]
  checks = {
    "max_abs_err_vs_dense_reference <= 1e-4 (all rows, SDEdit)": bool(
      max(row["max_abs_err_vs_dense_reference"] for row in rows) <= 1e-4
      and (sd is None or sd["max_abs_err_vs_dense_reference"] <= 1e-4)
      and (trained is None or trained["max_abs_sparse_vs_dense_reference"] <= 1e-4)),
    ">= 5x fewer MACs at <= 5% area": bool(min(row["mac_reduction"] for row in small) >= 5),
    ">= 3x lower wall time at <= 5% area": bool(min(row["speedup_median_of_pairs"] for row in small) >= 3),
  }
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "model": {
      "description": (f"UNet(block_out_channels={tuple(unet.block_out_channels)}, layers_per_block="
                      f"{unet.layers_per_block}, attention_levels={tuple(unet.attention_levels)}, "
                      f"attention_head_dim={unet.attention_head_dim}, norm_num_groups={unet.norm_num_groups})"),
      "params_m": params_m / 1e6,
      "input": f"1x{size}x{size}x3",
      "blocks": list(blocks),
    },
    "rows": rows,
    "sdedit": sd,
    "trained": trained,
    "name": a.name,
    "uptime_start": uptime_start,
    "speed_rows_resumed": resumed,
    "uptime_end": os.popen("uptime").read().strip(),
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  write_results(a.name, result, markdown(result))
  if not a.from_partial:
    os.remove(os.path.join("experiments", "results", f"{a.name}.partial.json"))


if __name__ == "__main__":
  main()
