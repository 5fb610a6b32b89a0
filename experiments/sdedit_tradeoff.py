"""SDEdit's realism-faithfulness trade-off (Meng et al. 2022, Fig. 3 / Table 1) on stroke paintings.

  python experiments/sdedit_tradeoff.py --workdir runs/mnist --judge runs/judges/mnist.safetensors \
      --data-path ../shared/data/mnist --name sdedit_mnist

Guides are stroke paintings (:func:`diffjax.editing.stroke_paintings`: thickened, block-averaged, three
grey levels, jittered) of real images the model held out. Each guide is edited without a class (the
model's null class, i.e. unconditionally, as in the paper) at strengths 0.2 ... 1.0 with DDIM, from the
same noise. Realism: Fréchet distance of the edits to the real data on judge features, and precision.
Faithfulness: RMS pixel distance to the guide (in [0, 1] units) and the fraction of edits the judge
reads as the digit that was painted. Small strength keeps the painting (faithful, unrealistic), strength 1
ignores it (realistic, unfaithful). Writes ``experiments/results/<name>.json``/``.md`` and a grid.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import load_run, load_scorer, machine, write_results

from diffjax.editing import stroke_paintings
from diffjax.editing.pipeline import make_sdedit
from diffjax.images import save_image_grid
from diffjax.training import builders


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--judge", required=True)
  p.add_argument("--data-path", default=None)
  p.add_argument("--num", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=200)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps of a full-strength run")
  p.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
  p.add_argument("--cell", type=int, default=None, help="stroke cell size (default: image side // 7)")
  p.add_argument("--brush", type=int, default=1, help="stroke thickening radius in pixels")
  p.add_argument("--levels", type=int, default=3, help="grey levels of the paintings")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="sdedit_tradeoff")
  a = p.parse_args()
  t_start = time.perf_counter()
  run = load_run(a.workdir)
  if a.data_path:
    run.config.data.path = a.data_path
  scorer, _judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  _, heldout = builders.load_data(run.config)
  n = min(a.num, len(heldout))
  real = heldout.subset(np.arange(n))
  cell = a.cell or max(1, run.image_shape[0] // 7)
  guides = stroke_paintings(real.images, seed=a.seed, cell=cell, levels=a.levels, brush=a.brush, jitter=1)
  edit = make_sdedit(
    model=run.model,
    schedule=run.schedule,
    image_shape=run.image_shape,
    prediction=run.config.diffusion.prediction,
  )
  bs = min(a.batch_size, n)
  key = jax.random.key(a.seed)

  def rms(x, y):
    return float(np.sqrt(np.mean((x.astype(np.float64) / 255.0 - y.astype(np.float64) / 255.0) ** 2)))

  def score(images):
    s = scorer(images, real.labels)
    return {
      "frechet_distance": s["frechet_distance"],
      "precision": s["precision"],
      "recall": s["recall"],
      "painted_digit_kept": s["class_accuracy"],
      "rms_to_guide": rms(images, guides),
    }

  rows = [{"strength": 0.0, "seconds": 0.0, **score(guides)}]
  grid = [guides[:10]]
  for strength in a.strengths:
    edit(run.params, key, guides[:bs], strength=strength, num_steps=a.steps)  # compile (traced strength)
    t0 = time.perf_counter()
    out = np.concatenate(
      [
        edit(run.params, jax.random.fold_in(key, i), guides[s : s + bs], strength=strength, num_steps=a.steps)
        for i, s in enumerate(range(0, n, bs))
      ]
    )
    seconds = time.perf_counter() - t0
    rows.append({"strength": strength, "seconds": round(seconds, 2), **score(out)})
    grid.append(out[:10])
    r = rows[-1]
    print(
      f"strength {strength:.1f}: FD {r['frechet_distance']:.2f} kept {r['painted_digit_kept']:.3f} "
      f"rms {r['rms_to_guide']:.3f} ({seconds:.0f}s)",
      flush=True,
    )
  save_image_grid(np.concatenate(grid), os.path.join("experiments/results", f"{a.name}_grid.png"), nrow=10)
  fd = [r["frechet_distance"] for r in rows]
  dist = [r["rms_to_guide"] for r in rows]
  checks = {
    "frechet_falls_from_guides_to_strength_1": fd[-1] < fd[0],
    "rms_to_guide_rises_with_strength": bool(all(b >= x for x, b in itertools.pairwise(dist))),
  }
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "workdir": a.workdir,
    "judge": a.judge,
    "num_guides": n,
    "stroke_cell": cell,
    "stroke_brush": a.brush,
    "stroke_levels": a.levels,
    "ddim_steps_full": a.steps,
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  lines = [
    f"# {a.name}: SDEdit realism vs faithfulness\n",
    (
      f"`{result['command']}` on {result['machine']}; {n} stroke paintings (cell {cell} px, brush {a.brush} px, "
      f"{a.levels} grey levels) of "
      f"held-out real images, edited without a class by DDIM (eta 0, {a.steps} steps at strength 1, "
      f"ceil(strength x {a.steps}) run). Strength 0 = the paintings themselves. FD: Fréchet distance to all "
      f"{scorer.num_reference} real images on judge features; kept: judge reads the painted digit; RMS: pixel "
      "distance to the guide in [0, 1] units.\n"
    ),
    "| strength | FD (realism, lower better) | precision | kept digit | RMS to guide (faithfulness) | seconds |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['strength']:.1f} | {r['frechet_distance']:.2f} | {r['precision']:.3f} | "
      f"{r['painted_digit_kept']:.3f} | {r['rms_to_guide']:.3f} | {r['seconds']:.0f} |"
    )
  lines.append("")
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  lines.append(
    f"\nGrid: first row guides, then one row per strength: `experiments/results/{a.name}_grid.png`"
  )
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
