"""ControlNet (Zhang et al. 2023) on MNIST or 8x8 digits: do samples follow the conditioning image?

  python experiments/controlnet.py --workdir runs/mnist_controlnet --judge runs/judges/mnist.safetensors \
      --data-path ../shared/data/mnist
  python experiments/controlnet.py --workdir runs/digits_controlnet --judge runs/judges/digits.safetensors \
      --name controlnet_digits

The ControlNet of ``--workdir`` (``python -m diffjax train-controlnet``) steers its frozen base. Controls
are computed from real digits the base and the ControlNet never trained on (the held-out split), with the
training signal (edges: thinned Sobel edge maps). Every row samples one image per control without a class
(the base's null class) with DDIM from the same initial noise:

* ``no control``: the base alone;
* ``scale s``: the controlled model at conditioning scale s (0 must equal the base exactly).

Agreement with the control: for edge controls the IoU of the control edges and the samples' edges (the same
detector; also with a one-pixel tolerance) and their L1 distance; for any control the L1 distance between
the control and the signal computed from the sample; and the fraction of samples the judge reads as the
digit the control came from. Sample quality: Fréchet distance, precision and recall on judge features
against the real data. A reference row pairs each control with the edges of a different real digit
(chance-level agreement). Writes ``experiments/results/<name>.json``/``.md`` and a grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import RowCache, machine, write_results

from diffjax.control import control_cond, make_controlled_model_fn
from diffjax.data import load_dataset, to_model_range, to_uint8
from diffjax.data.control_signals import edge_agreement
from diffjax.eval import load_judge
from diffjax.eval.metrics import SampleScorer
from diffjax.images import save_image_grid
from diffjax.samplers import ddim_sample
from diffjax.training.controlnet_run import load_controlnet
from diffjax.training.step import make_model_fn


def agreement(run, controls: np.ndarray, samples_u8: np.ndarray) -> dict:
  """Agreement of uint8 samples with their float controls (see the module docstring)."""
  x = jnp.asarray(to_model_range(samples_u8))
  out = {"control_l1": float(jnp.mean(jnp.abs(run.control_fn(x) - controls)))}
  if run.config.control.kind == "edges":
    c = run.config.control
    for tol in (0, 1):
      iou, _ = edge_agreement(controls, x, threshold=c.threshold, thin=c.thin, tolerance=tol)
      out[f"edge_iou_tol{tol}"] = float(jnp.mean(iou))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="ControlNet work directory")
  p.add_argument("--judge", required=True)
  p.add_argument("--data-path", default=None, help="overrides the base config's data.path")
  p.add_argument("--base-workdir", default=None, help="overrides the base work directory in the config")
  p.add_argument("--num", type=int, default=500, help="controls (held-out digits)")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.5, 1.0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default=None, help="default: controlnet (edges) or controlnet_<kind>")
  a = p.parse_args()
  t_start, load = time.perf_counter(), os.getloadavg()
  run = load_controlnet(a.workdir, base_workdir=a.base_workdir, data_path=a.data_path)
  kind = run.config.control.kind
  name = a.name or ("controlnet" if kind == "edges" else f"controlnet_{kind}")
  data = run.base_config.data
  reference = load_dataset(source=data.source, path=data.path, split=data.split)
  judge_params, judge_info = load_judge(a.judge, expected_fingerprint=reference.fingerprint())
  scorer = SampleScorer(judge_params=judge_params, judge_info=judge_info, reference=reference)

  n = min(a.num, len(run.heldout))
  bs = min(a.batch_size, n)
  if n % bs:
    raise ValueError(f"--num ({n}) must be a multiple of --batch-size ({bs})")
  real = run.heldout.subset(np.arange(n))
  controls = np.asarray(run.control_fn(jnp.asarray(to_model_range(real.images))))
  null = None if run.unet.num_classes is None else run.unet.num_classes
  base_fn, ctrl_fn = make_model_fn(run.unet), make_controlled_model_fn(run.unet, run.controlnet)
  pred = run.base_config.diffusion.prediction

  @jax.jit
  def generate(params, key, control, scale, num_steps):
    b = control.shape[0]
    labels = None if null is None else jnp.full((b,), null, jnp.int32)
    x_T = jax.random.normal(key, (b, *run.image_shape))
    common = {"schedule": run.schedule, "x_T": x_T, "key": key, "num_steps": num_steps, "prediction": pred}
    if scale is None:
      return ddim_sample(model_fn=base_fn, params=params["base"], cond=labels, **common)
    return ddim_sample(model_fn=ctrl_fn, params=params, cond=control_cond(labels, control, scale), **common)

  def sample(scale):
    jax.block_until_ready(generate(run.params, jax.random.key(0), controls[:bs], scale, 1))  # compile
    out, t0 = [], time.perf_counter()
    for i in range(n // bs):
      key = jax.random.fold_in(jax.random.key(a.seed), i)
      out.append(jax.device_get(generate(run.params, key, controls[i * bs : (i + 1) * bs], scale, a.steps)))
    return to_uint8(np.concatenate(out)), time.perf_counter() - t0

  cache = RowCache(
    name,
    {
      "workdir": os.path.abspath(a.workdir),
      "judge": os.path.abspath(a.judge),
      "num": n,
      "seed": a.seed,
      "steps": a.steps,
    },
  )
  rows, grid = [], [to_uint8(2.0 * controls[:10, ..., :1] - 1.0), real.images[:10]]
  for scale in [None, *a.scales]:
    label = "no control" if scale is None else f"scale {scale:g}"
    if cache.get(label):
      rows.append(cache.get(label))
      print(f"{label}: reused", flush=True)
      continue
    images, seconds = sample(scale)
    row = {"setting": label, "conditioning_scale": scale, "seconds": round(seconds, 1)}
    row.update(agreement(run, controls, images))
    q = scorer(images, real.labels)
    row.update(
      frechet_distance=q["frechet_distance"],
      precision=q["precision"],
      recall=q["recall"],
      control_digit_kept=q["class_accuracy"],
    )
    rows.append(row)
    cache.put(label, row)
    grid.append(images[:10])
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

  # Chance level: each control against a different real digit.
  shuffled = np.roll(real.images, 1, axis=0)
  chance = {"setting": "real digit, other control", "conditioning_scale": None, "seconds": 0.0}
  chance.update(agreement(run, controls, shuffled))
  real_own = {"setting": "real digit, own control", "conditioning_scale": None, "seconds": 0.0}
  real_own.update(agreement(run, controls, real.images))
  rows += [chance, real_own]
  if len(grid) == 2 + 1 + len(a.scales):
    save_image_grid(np.concatenate(grid), os.path.join("experiments/results", f"{name}_grid.png"), nrow=10)

  key_metric = "edge_iou_tol0" if kind == "edges" else "control_l1"
  by = {r["setting"]: r for r in rows}
  base_row, top = by["no control"], by.get(f"scale {max(a.scales):g}")
  checks = {
    "metric": key_metric,
    "no_control": base_row[key_metric],
    "max_scale": None if top is None else top[key_metric],
    "scale0_equals_base": bool(by.get("scale 0", {}).get(key_metric) == base_row[key_metric])
    if "scale 0" in by
    else None,
  }
  if top is not None:
    better = (
      top[key_metric] > base_row[key_metric] if kind == "edges" else top[key_metric] < base_row[key_metric]
    )
    checks["control_beats_no_control"] = bool(better)
  metrics_cfg = run.config.to_dict()
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "load_average_at_start": [round(v, 2) for v in load],
    "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    "controlnet_workdir": a.workdir,
    "base_workdir": run.config.base.workdir,
    "control": metrics_cfg["control"],
    "controlnet_training_steps": int(run.config.training.num_steps),
    "num_controls": n,
    "ddim_steps": a.steps,
    "seed": a.seed,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  cols = ["edge_iou_tol0", "edge_iou_tol1"] if kind == "edges" else []
  cols += ["control_l1", "control_digit_kept", "frechet_distance", "precision", "recall", "seconds"]
  lines = [
    f"# {name}: ControlNet ({kind}) on a frozen {data.source} DDPM\n",
    f"`{result['command']}` on {result['machine']} (load average {result['load_average_at_start']} at the "
    f"start, {result['load_average_at_end']} at the end). {n} controls computed from held-out {data.source} images "
    f"(never seen by the base or the ControlNet), one sample each, DDIM-{a.steps} (eta 0) from the same "
    f"noise in every row, no class (the base's null class). ControlNet: {result['controlnet_training_steps']} "
    f"training steps on the frozen base `{run.config.base.workdir}`, control `{metrics_cfg['control']}`.\n",
    "Agreement: IoU of the control edges and the samples' edges (same detector; tol 1 = both dilated by "
    "one pixel), L1 between the control and the sample's own signal (for edges: the edge maps), and the "
    "fraction of samples the judge "
    "reads as the digit the control came from. Quality: Fréchet distance (FD), precision, recall on judge "
    "features against all real images. The last two rows apply the metrics to real digits (chance level: "
    "another digit's control; ceiling: its own).\n",
    "| setting | " + " | ".join(cols) + " |",
    "|---|" + "---|" * len(cols),
  ]
  for r in rows:
    vals = [r.get(c) for c in cols]
    lines.append(
      f"| {r['setting']} | "
      + " | ".join("–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in vals)
      + " |"
    )
  lines.append("")
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  lines.append(
    f"\nGrid `experiments/results/{name}_grid.png`: controls, their source digits, then one row per setting in "
    "table order."
  )
  write_results(name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
