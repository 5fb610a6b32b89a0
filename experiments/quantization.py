"""Post-training quantization of a trained class-conditional DDPM: calibration methods and shortcut splitting.

  python -m diffjax train --config configs/mnist_ddpm.py --workdir runs/mnist --config.data.path=PATH
  python -m diffjax train-judge --source mnist_idx --path PATH --split test --out runs/judges/mnist.safetensors
  python experiments/quantization.py --workdir runs/mnist --judge runs/judges/mnist.safetensors \
      --data-path PATH --name quantization

The sklearn-digits model (8x8, no data download; ``configs/digits_ddpm.py``) and its judge:

  python -m diffjax train --config configs/digits_ddpm.py --workdir runs/digits_ddpm
  python -m diffjax train-judge --source digits --out runs/judges/digits.safetensors
  python experiments/quantization.py --workdir runs/digits_ddpm --judge runs/judges/digits.safetensors \
      --num 1000 --batch-size 250 --steps 50 --calib-num 256 --bits W8A8 W4A8 W4A4 --adaround-seeds 1 2 \
      --name quantization_digits

For W8A8, W4A8 and W4A4 (``--bits``), with and without Q-Diffusion's split shortcut quantization, the
model is calibrated along full-precision DDIM trajectories (``--calib-num`` trajectories, other noise
than the evaluation's) with each method of :mod:`diffjax.quantization.calibration`: one step (naive,
the last step), one random step per trajectory (naive), time-aware (Q-Diffusion) and per-timestep
scale tables. Every row samples the same labels from the same initial noise (paired comparisons) with
deterministic DDIM and is scored by the judge (Fréchet distance on its features, class accuracy,
precision/recall); two full-precision rows from different seeds give the FD noise of the sample size.
Each configuration is exported as integer safetensors (:mod:`diffjax.quantization.export`), reloaded
and checked bit-exact; the table reports its weight bytes. A distilled few-step student
(``--student`` work directory and stage of ``python -m diffjax distill``) gets the same treatment at
its own step count. Below 8-bit weights, AdaRound rows learn the weight rounding block by block
(:mod:`diffjax.quantization.adaround`) for naive (last step, one random step) and time-aware calibration
without split and for time-aware with split, each on 128 examples of its own calibration's kind, so that
calibration and splitting are compared under the same weight reconstruction (as in Q-Diffusion); and a
diagnostic row keeps the low-bit weights with float activations (the weight rounding error alone, which
activation calibration cannot remove). Tables and checks: ``experiments/quantization_report.py``. Rows are cached in ``runs/partial/NAME.json`` (keyed by everything but ``--bits``), so a
stopped run resumes and a run with more ``--bits`` or ``--adaround-seeds`` (AdaRound repeats with other
rounding seeds: the noise of the learned rounding) only adds rows.
Writes ``experiments/results/NAME.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quantization_report import checks, markdown
from trained_run import RESULTS, RowCache, balanced_labels, load_run, load_scorer, machine, write_results

from diffjax.data import to_uint8
from diffjax.guidance import classifier_free_guidance
from diffjax.images import save_image_grid
from diffjax.quantization import QuantConfig, QuantizedModel, calibrate, record_ddim_inputs
from diffjax.quantization.adaround import adaround
from diffjax.quantization.export import load_quantized, save_quantized
from diffjax.samplers import ddim_sample
from diffjax.training.step import make_model_fn

METHODS = ("single", "random", "time_aware", "per_timestep")
METHOD_NAMES = {
  "single": "naive: last step only",
  "random": "naive: one random step",
  "time_aware": "time-aware",
  "per_timestep": "per-timestep table",
  "adaround": "time-aware + AdaRound",
  "adaround_single": "naive: last step + AdaRound",
  "adaround_random": "naive: one random step + AdaRound",
}
# The activation calibration of each AdaRound row; its rounding is learned on the same kind of examples.
ADAROUND_CALIBRATION = {"adaround": "time_aware", "adaround_single": "single", "adaround_random": "random"}


def make_sampler(model_fn, *, model, schedule, image_shape, num_steps, guidance, spacing, prediction):
  """``sample(variables, key, labels) -> [B, H, W, C]``: DDIM (eta 0), one pass per step when w = 1."""
  null = model.num_classes

  @jax.jit
  def sample(variables, key, labels):
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (labels.shape[0], *image_shape), jnp.float32)
    fn = model_fn
    if guidance != 1.0:
      fn = classifier_free_guidance(model_fn, guidance_scale=guidance, null_cond=jnp.full_like(labels, null))
    return ddim_sample(
      model_fn=fn,
      params=variables,
      schedule=schedule,
      x_T=x_T,
      key=jax.random.fold_in(key, 1),
      cond=labels,
      num_steps=num_steps,
      eta=0.0,
      spacing=spacing,
      prediction=prediction,
    )

  return sample


def sample_all(sample, variables, labels, *, batch_size, seed):
  """Samples ``labels`` in batches; batch i starts from ``fold_in(key(seed), i)``. Returns (uint8, seconds)."""
  key = jax.random.key(seed)
  out, t0 = [], time.perf_counter()
  for i, start in enumerate(range(0, len(labels), batch_size)):
    lab = jnp.asarray(labels[start : start + batch_size])
    out.append(np.asarray(sample(variables, jax.random.fold_in(key, i), lab)))
  return to_uint8(np.concatenate(out)), time.perf_counter() - t0


def check_round_trip(qmodel, params, quant, x, t, y) -> dict:
  """Exports ``quant`` + ``params``, reloads them and compares the quantized outputs bit for bit."""
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "q.safetensors")
    sizes = save_quantized(path, params, quant, qmodel.config)
    p2, q2, cfg2 = load_quantized(path)
  if cfg2 != qmodel.config:
    raise RuntimeError(f"reloaded config {cfg2} differs from the exported {qmodel.config}")
  # One compiled function for both: eager and jitted float arithmetic may differ by an ulp, which can
  # move an activation across a rounding boundary, so they are compared with the same program.
  apply = jax.jit(QuantizedModel(qmodel.model, cfg2).apply)
  a = np.asarray(apply({"params": params, "quant": quant}, x, t, y))
  b = np.asarray(apply({"params": p2, "quant": q2}, x, t, y))
  return {**sizes, "round_trip_max_abs_diff": float(np.max(np.abs(a - b)))}


def run_model(
  a, *, tag, model, schedule, params, image_shape, prediction, spacing, num_steps, scorer, cache, rows
):
  """All rows (full precision, then every bits x split x method) of one model."""
  labels = balanced_labels(a.num, model.num_classes)
  common = {
    "model": model,
    "schedule": schedule,
    "image_shape": image_shape,
    "num_steps": num_steps,
    "guidance": a.guidance,
    "spacing": spacing,
    "prediction": prediction,
  }
  fp_fn = make_model_fn(model)
  fp_sample = make_sampler(fp_fn, **common)

  def add(key, row, images=None, grid=None):
    row = {"model": tag, **row}
    rows.append(row)
    cache.put(f"{tag}/{key}", row)
    if images is not None and grid:
      save_image_grid(images[:100], os.path.join(RESULTS, f"{a.name}_{grid}.png"), nrow=model.num_classes)
    print(
      f"{tag:8s} {key:40s} FD {row['frechet_distance']:8.3f} acc {row['class_accuracy']:.3f}"
      f" ({row.get('sample_s', 0):.0f} s)",
      flush=True,
    )

  fp_bytes = 4 * sum(int(np.size(v)) for v in jax.tree.leaves(params))
  for seed in (a.seed, a.seed + 1):
    key = f"fp/seed{seed}"
    if cache.get(f"{tag}/{key}"):
      rows.append(cache.get(f"{tag}/{key}"))
      continue
    images, secs = sample_all(fp_sample, params, labels, batch_size=a.batch_size, seed=seed)
    grid = f"{tag}_fp" if seed == a.seed else None
    add(
      key,
      {
        "config": "FP32",
        "method": "full precision",
        "split": False,
        "seed": seed,
        "weight_bytes": fp_bytes,
        "sample_s": round(secs, 1),
        **scorer(images, labels),
      },
      images,
      grid,
    )

  # Calibration trajectories: other labels order and noise than the evaluation's.
  calib_labels = jnp.asarray(
    np.random.default_rng(a.seed + 7).permutation(balanced_labels(a.calib_num, model.num_classes))
  )
  x_T = jax.random.normal(jax.random.key(a.seed + 1000), (a.calib_num, *image_shape), jnp.float32)
  guid = (
    {}
    if a.guidance == 1.0
    else {"guidance_scale": a.guidance, "null_cond": jnp.full_like(calib_labels, model.num_classes)}
  )
  inputs = None

  probe = (
    jnp.asarray(np.random.default_rng(0).standard_normal((8, *image_shape)), jnp.float32),
    jnp.full((8,), schedule.num_timesteps // 2, jnp.int32),
    jnp.arange(8, dtype=jnp.int32) % model.num_classes,
  )
  def record():
    t0 = time.perf_counter()
    recorded, _ = record_ddim_inputs(
      model_fn=fp_fn,
      params=params,
      schedule=schedule,
      x_T=x_T,
      key=jax.random.key(a.seed + 2000),
      cond=calib_labels,
      num_steps=num_steps,
      spacing=spacing,
      prediction=prediction,
      **guid,
    )
    secs = time.perf_counter() - t0
    print(f"{tag}: recorded {recorded.x.shape} calibration inputs in {secs:.0f} s", flush=True)
    return recorded

  for bits in a.bits:
    w_bits, a_bits = (int(b) for b in bits.lower().lstrip("w").split("a"))
    for split in (False, True):
      qmodel = QuantizedModel(model, QuantConfig.wa(w_bits, a_bits, split_shortcut=split))
      q_sample = make_sampler(qmodel.model_fn, **common)
      methods = list(METHODS)
      if w_bits < 8 and a.adaround_iters:
        # Every calibration arm with the same learned weight rounding (Q-Diffusion compares calibrations
        # with BRECQ/AdaRound in all arms): without split, naive and time-aware; with split, time-aware.
        methods += ["adaround"] if split else ["adaround_single", "adaround_random", "adaround"]
      runs = [(m, a.seed) for m in methods]
      # Repeats with other rounding seeds (AdaRound's examples and batches): the noise of learned rounding.
      runs += [(m, s) for s in a.adaround_seeds if s != a.seed for m in methods if m in ADAROUND_CALIBRATION]
      for method, r_seed in runs:
        key = f"W{w_bits}A{a_bits}/{method}/split{int(split)}"
        if r_seed != a.seed:
          key += f"/rounding_seed{r_seed}"
        if cache.get(f"{tag}/{key}"):
          rows.append(cache.get(f"{tag}/{key}"))
          continue
        if inputs is None:
          inputs = record()
        t0 = time.perf_counter()
        cal = ADAROUND_CALIBRATION.get(method, method)
        quant = calibrate(qmodel, params, inputs, method=cal, seed=a.seed, batch_size=a.batch_size)
        q_params, extra = params, {}
        if method in ADAROUND_CALIBRATION:
          q_params, report = adaround(
            qmodel, params, quant, inputs, method=cal, iters=a.adaround_iters, seed=r_seed, verbose=True
          )
          extra = {"adaround_seed": r_seed, "adaround_blocks": report}
        calib_s = time.perf_counter() - t0
        variables = {"params": q_params, "quant": quant}
        images, secs = sample_all(q_sample, variables, labels, batch_size=a.batch_size, seed=a.seed)
        sizes = check_round_trip(qmodel, q_params, quant, *probe)
        grid = (
          f"{tag}_W{w_bits}A{a_bits}_{method}_split{int(split)}"
          if method in ("single", "time_aware") and split == (method == "time_aware")
          else None
        )
        add(
          key,
          {
            "config": f"W{w_bits}A{a_bits}",
            "method": METHOD_NAMES[method] + (f" (rounding seed {r_seed})" if r_seed != a.seed else ""),
            "split": split,
            "seed": a.seed,
            "weight_bytes": sizes["total"],
            "file_bytes": sizes["file"],
            "round_trip_max_abs_diff": sizes["round_trip_max_abs_diff"],
            "calibration_s": round(calib_s, 1),
            "sample_s": round(secs, 1),
            **extra,
            **scorer(images, labels),
          },
          images,
          grid,
        )

  # Diagnostic: the same low-bit weights with float activations (nothing for calibration to fix), which
  # separates the weight rounding error from the activation quantization error.
  for w_bits in sorted({int(b.lower().lstrip("w").split("a")[0]) for b in a.bits} - {8}):
    key = f"W{w_bits}A32/weights_only/split0"
    if cache.get(f"{tag}/{key}"):
      rows.append(cache.get(f"{tag}/{key}"))
      continue
    if inputs is None:
      inputs = record()
    float_acts = (("conv_in", 8, None), ("conv_out", 8, None))
    qmodel = QuantizedModel(model, QuantConfig.wa(w_bits, None, layer_bits=float_acts))
    t0 = time.perf_counter()
    quant = calibrate(qmodel, params, inputs, method="time_aware", seed=a.seed, batch_size=a.batch_size)
    calib_s = time.perf_counter() - t0
    images, secs = sample_all(
      make_sampler(qmodel.model_fn, **common), {"params": params, "quant": quant}, labels,
      batch_size=a.batch_size, seed=a.seed,
    )
    sizes = check_round_trip(qmodel, params, quant, *probe)
    add(
      key,
      {
        "config": f"W{w_bits}A32",
        "method": "weights only (float activations)",
        "split": False,
        "seed": a.seed,
        "weight_bytes": sizes["total"],
        "file_bytes": sizes["file"],
        "round_trip_max_abs_diff": sizes["round_trip_max_abs_diff"],
        "calibration_s": round(calib_s, 1),
        "sample_s": round(secs, 1),
        **scorer(images, labels),
      },
    )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained class-conditional model")
  p.add_argument("--judge", required=True)
  p.add_argument("--data-path", default=None, help="overrides the config's data.path (MNIST IDX directory)")
  p.add_argument("--student", default=None, help="distill work directory (optional)")
  p.add_argument("--student-stage", default=None, help="stage name in --student (default: the last)")
  p.add_argument("--num", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=1.0)
  p.add_argument("--calib-num", type=int, default=256, help="calibration trajectories")
  p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4"])
  p.add_argument(
    "--adaround-iters", type=int, default=500, help="AdaRound rows below 8-bit weights (0: none)"
  )
  p.add_argument(
    "--adaround-seeds", type=int, nargs="+", default=[], help="extra AdaRound rows with these rounding seeds"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="quantization")
  a = p.parse_args()
  t_start = time.perf_counter()
  run = load_run(a.workdir)
  scorer, judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  # Rows are keyed by their configuration, so --bits only selects rows and is not part of the cache key.
  settings = {k: v for k, v in vars(a).items() if k not in ("name", "bits", "adaround_seeds")}
  cache = RowCache(a.name, settings)
  rows: list[dict] = []
  spacing = run.config.sample.get("spacing", "uniform")
  run_model(
    a,
    tag="teacher",
    model=run.model,
    schedule=run.schedule,
    params=run.params,
    image_shape=run.image_shape,
    prediction=run.config.diffusion.prediction,
    spacing=spacing,
    num_steps=a.steps,
    scorer=scorer,
    cache=cache,
    rows=rows,
  )
  if a.student:
    from diffjax.distillation import load_stage, stage_names

    stage = a.student_stage or stage_names(a.student)[-1]
    model, schedule, params, cfg = load_stage(a.student, stage)
    run_model(
      a,
      tag="student",
      model=model,
      schedule=schedule,
      params=params,
      image_shape=run.image_shape,
      prediction=cfg.diffusion.prediction if "diffusion" in cfg else "v",
      spacing="trailing",
      num_steps=int(cfg.stage.student_steps),
      scorer=scorer,
      cache=cache,
      rows=rows,
    )
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "load": os.getloadavg()[0],
    "workdir": a.workdir,
    "judge": a.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "num_samples": a.num,
    "num_reference": scorer.num_reference,
    "steps": a.steps,
    "guidance": a.guidance,
    "calib_num": a.calib_num,
    "seed": a.seed,
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  result["checks"] = checks(result)
  write_results(a.name, result, markdown(a.name, result))


if __name__ == "__main__":
  main()
