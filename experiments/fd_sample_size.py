"""How the Fréchet distance depends on the number of samples, and its N -> infinity limit (DDIM eta 0 vs 1).

  python experiments/fd_sample_size.py --workdir /work/assets/mnist_ddpm_simple2 \
      --judge /work/assets/judges/mnist.safetensors --data-path ../shared/data/mnist --num 4000

The Fréchet distance of N samples overestimates the distance between the distributions by about c / N,
with c larger for a more spread-out generator (Chong & Forsyth 2020, "Effectively Unbiased FID and
Inception Score and where to find them"). DDIM with eta = 0 spreads its samples more than eta = 1 (higher
recall, lower precision in ``ddim_steps``), so at a few hundred samples the bias alone can reverse the
comparison that DDIM's Table 1 makes at 50,000. This script samples ``--num`` class-conditional images
per setting (DDIM, uniform timesteps, x0 clipped, same labels and noise for every setting), computes the
judge-feature Fréchet distance against all real images on random subsets of each ``--sizes`` (mean of
``--draws`` subsets) and the FD-infinity extrapolation of
:func:`diffjax.eval.frechet_distance_infinity` (least-squares fit of FD(N) = FD_inf + c / N over the
sizes). Writes ``experiments/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import balanced_labels, load_run, load_scorer, machine, sample_timed, write_results

from diffjax.eval import features_and_logits, frechet_distance_infinity
from diffjax.sampling import make_generate


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained class-conditional work directory")
  p.add_argument("--judge", required=True, help="judge .safetensors trained on the same data")
  p.add_argument("--data-path", default=None, help="overrides the config's data.path")
  p.add_argument("--num", type=int, default=4000, help="samples per setting (the largest subset)")
  p.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 3000, 4000])
  p.add_argument("--draws", type=int, default=5, help="random subsets averaged per size")
  p.add_argument("--steps", type=int, nargs="+", default=[10, 20])
  p.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="fd_sample_size")
  a = p.parse_args()
  if a.num < 2:
    p.error(f"--num: expected at least 2 samples, got {a.num}")
  bad = [s for s in a.sizes if not 2 <= s <= a.num]
  if bad or len(set(a.sizes)) < 2:
    p.error(f"--sizes: expected at least two distinct sizes in [2, --num={a.num}], got {a.sizes}")
  if a.draws < 1 or min(a.steps) < 1 or a.batch_size < 1:
    p.error("--draws, --steps and --batch-size must be positive")
  return a


def main() -> None:
  a = parse_args()
  t_start = time.perf_counter()
  run = load_run(a.workdir)
  scorer, judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  labels = balanced_labels(a.num, run.num_classes)
  generate = make_generate(
    sampler="ddim", spacing="uniform", clip_x0=1.0, model=run.model, schedule=run.schedule,
    image_shape=run.image_shape, prediction=run.config.diffusion.prediction,
  )  # fmt: skip
  rows = []
  for steps in a.steps:
    for eta in a.etas:
      images, seconds = sample_timed(
        generate, run.params, labels=labels, batch_size=a.batch_size, seed=a.seed,
        num_steps=steps, guidance=1.0, eta=eta,
      )  # fmt: skip
      feats, logits = features_and_logits(scorer.judge_params, images)
      fd = frechet_distance_infinity(
        feats, scorer.reference_features, sizes=a.sizes, draws=a.draws, seed=a.seed
      )
      row = {
        "steps": steps,
        "eta": eta,
        "class_accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)),
        "seconds": round(seconds, 1),
        **fd,
      }
      rows.append(row)
      print(
        f"steps {steps} eta {eta:g}: FD by N {dict(zip(fd['sizes'], np.round(fd['frechet_distances'], 2)))} "
        f"FD_inf {fd['frechet_distance_infinity']:.2f} ({seconds:.0f}s)",
        flush=True,
      )

  def pick(steps, eta):
    return next((r for r in rows if r["steps"] == steps and r["eta"] == eta), None)

  checks = {}
  for steps in a.steps:
    r0, r1 = pick(steps, 0.0), pick(steps, 1.0)
    if r0 and r1:
      for i, n in enumerate(r0["sizes"]):
        checks[f"eta0_beats_eta1_at_{steps}_steps_N{n}"] = (
          r0["frechet_distances"][i] < r1["frechet_distances"][i]
        )
      checks[f"eta0_beats_eta1_at_{steps}_steps_FD_inf"] = (
        r0["frechet_distance_infinity"] < r1["frechet_distance_infinity"]
      )
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "workdir": a.workdir,
    "trained_steps": run.step,
    "judge": a.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "num_samples": a.num,
    "num_reference": scorer.num_reference,
    "draws": a.draws,
    "seed": a.seed,
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  sizes = rows[0]["sizes"]
  lines = [
    f"# {a.name}: Fréchet distance vs number of samples, and FD-infinity (Chong & Forsyth 2020)\n",
    (
      f"`{result['command']}` on {result['machine']}; model at step {run.step}; class-conditional DDIM "
      f"(w = 1, uniform timesteps, x0 clipped), {a.num} samples per row from the same labels and noise; "
      f"judge-feature Fréchet distance against all {scorer.num_reference} real images, mean of {a.draws} random "
      "subsets of N samples (one at N = all); FD_inf and slope c from a least-squares fit of FD(N) = FD_inf + "
      "c / N over the sizes. Lower is better.\n"
    ),
    "| steps | eta | " + " | ".join(f"FD N={n}" for n in sizes) + " | FD_inf | c | class accuracy |",
    "|---" * (len(sizes) + 5) + "|",
  ]
  for r in rows:
    cells = " | ".join(f"{v:.2f}" for v in r["frechet_distances"])
    lines.append(
      f"| {r['steps']} | {r['eta']:g} | {cells} | {r['frechet_distance_infinity']:.2f} | {r['slope']:.0f} | "
      f"{r['class_accuracy']:.3f} |"
    )
  lines.append("")
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
