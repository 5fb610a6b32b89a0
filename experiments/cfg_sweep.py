"""The classifier-free guidance trade-off (Ho & Salimans 2022, Fig. 4-5): fidelity up, diversity down with w.

  python experiments/cfg_sweep.py --workdir runs/mnist --judge runs/judges/mnist.safetensors \
      --data-path ../shared/data/mnist

diffjax's guidance scale ``s`` combines ``eps_u + s (eps_c - eps_u)``: s = 0 is the unconditional model,
s = 1 the conditional one, and the paper's weight is ``w = s - 1`` (``(1 + w) eps_c - w eps_u``). For a
model trained with label dropout (``experiments/ddpm_run.py``), samples DDIM (eta 0) at each scale from
the same labels and noise and scores them with the judge: class accuracy (fidelity to the label),
Fréchet distance, precision and recall (diversity). Writes ``experiments/results/cfg_sweep.json``/``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import RowCache, balanced_labels, load_run, load_scorer, machine, sample_timed, write_results

from diffjax.images import save_image_grid
from diffjax.sampling import make_generate


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained class-conditional work directory")
  p.add_argument("--judge", required=True, help="judge .safetensors trained on the same data")
  p.add_argument("--data-path", default=None, help="overrides the config's data.path")
  p.add_argument("--num", type=int, default=500, help="samples per guidance scale")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 9.0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="cfg_sweep")
  a = p.parse_args()
  t_start = time.perf_counter()

  run = load_run(a.workdir)
  scorer, judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  labels = balanced_labels(a.num, run.num_classes)
  generate = make_generate(
    model=run.model,
    schedule=run.schedule,
    image_shape=run.image_shape,
    sampler="ddim",
    prediction=run.config.diffusion.prediction,
  )
  rows, grids = [], []
  cache = RowCache(
    a.name,
    {
      "workdir": os.path.abspath(a.workdir),
      "judge": os.path.abspath(a.judge),
      "num": a.num,
      "seed": a.seed,
      "steps": a.steps,
      "step": run.step,
    },
  )
  for s in a.scales:
    if cache.get(str(s)):
      rows.append(cache.get(str(s)))
      print(f"s={s:g}: reused", flush=True)
      continue
    images, seconds = sample_timed(
      generate,
      run.params,
      labels=labels,
      batch_size=a.batch_size,
      seed=a.seed,
      num_steps=a.steps,
      guidance=s,
      eta=0.0,
    )
    score = scorer(images, labels)
    rows.append({"guidance_scale": s, "paper_w": s - 1.0, "seconds": round(seconds, 2), **score})
    cache.put(str(s), rows[-1])
    grids.append(images[: 2 * run.num_classes])
    print(
      f"s={s:g}: acc {score['class_accuracy']:.3f} FD {score['frechet_distance']:.3f} "
      f"P {score['precision']:.3f} R {score['recall']:.3f} ({seconds:.0f}s)",
      flush=True,
    )
  # One grid: a row pair per scale, classes along the columns.
  if grids:  # (rows reused from an earlier, stopped run are not in the grid)
    save_image_grid(
      np.concatenate(grids), os.path.join("experiments/results", f"{a.name}_grid.png"), nrow=run.num_classes
    )

  acc = [r["class_accuracy"] for r in rows]
  order = np.argsort(a.scales)
  accs_sorted = [acc[i] for i in order]
  checks = {
    "accuracy_at_lowest_scale": accs_sorted[0],
    "accuracy_at_highest_scale": accs_sorted[-1],
    "accuracy_nondecreasing_within_0.01": bool(
      all(b >= a_ - 0.01 for a_, b in itertools.pairwise(accs_sorted))
    ),
    "best_frechet_scale": a.scales[int(np.argmin([r["frechet_distance"] for r in rows]))],
  }
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "workdir": a.workdir,
    "trained_steps": run.step,
    "judge": a.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "num_samples": a.num,
    "ddim_steps": a.steps,
    "seed": a.seed,
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  lines = [
    f"# {a.name}: classifier-free guidance trade-off\n",
    (
      f"`{result['command']}` on {result['machine']}; {a.num} samples per row, DDIM-{a.steps} (eta 0), same "
      f"labels and initial noise in every row. Scale s: eps_u + s (eps_c - eps_u); the paper's w = s - 1. "
      f"Judge held-out accuracy on real images {judge_info.get('heldout_accuracy')}; Fréchet distance (FD) "
      f"on judge features against all {scorer.num_reference} real images.\n"
    ),
    "| scale s | paper w | class accuracy | FD | precision | recall | seconds |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['guidance_scale']:g} | {r['paper_w']:g} | {r['class_accuracy']:.3f} | "
      f"{r['frechet_distance']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.0f} |"
    )
  lines.append("")
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  lines.append(
    f"\nGrid (two rows per scale, in the order of the table): `experiments/results/{a.name}_grid.png`"
  )
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
