"""Sample quality against the number of sampling steps, the shape of DDIM's Table 1 (Song et al. 2021).

  python -m diffjax train-judge --source mnist_idx --path ../shared/data/mnist --split test \
      --out runs/judges/mnist.safetensors --steps 2000
  python experiments/ddim_steps.py --workdir runs/mnist --judge runs/judges/mnist.safetensors \
      --data-path ../shared/data/mnist

For a model trained with ``experiments/ddpm_run.py`` (MNIST config), samples class-conditionally (w = 1,
no guidance; ``--guidance 0`` samples the unconditional branch, like the paper's unconditional models) with DDIM eta = 0 and eta = 1 at 10/20/50/100 steps and with DDPM ancestral sampling at all
1000 steps, every setting from the same labels and initial noise, and scores each set with the judge:
Fréchet distance on judge features, precision/recall and class accuracy. DDIM's paper finds
deterministic DDIM (eta = 0) best at few steps, with the gap closing as steps grow, and 50-100 DDIM steps
close to 1000-step DDPM. Writes ``experiments/results/ddim_steps.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import (
  RowCache,
  balanced_labels,
  load_run,
  load_scorer,
  machine,
  sample_timed,
  write_results,
)

from diffjax.images import save_image_grid
from diffjax.sampling import make_generate


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained class-conditional work directory")
  p.add_argument("--judge", required=True, help="judge .safetensors trained on the same data")
  p.add_argument("--data-path", default=None, help="overrides the config's data.path")
  p.add_argument("--num", type=int, default=500, help="samples per setting")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
  p.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
  p.add_argument("--no-ddpm", action="store_true", help="skip the 1000-step DDPM reference")
  p.add_argument("--no-clip", action="store_true", help="no x0 clipping (DDIM's code) instead of [-1, 1]")
  p.add_argument(
    "--spacing", default="uniform", choices=["uniform", "quadratic", "trailing"],
    help="DDIM timestep subset (DDIM's paper: uniform, quadratic for CIFAR-10)",
  )
  p.add_argument(
    "--guidance", type=float, default=1.0,
    help="CFG weight w: 1 = class-conditional, 0 = the unconditional branch (DDIM's Table 1 models)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="ddim_steps")
  a = p.parse_args()
  t_start = time.perf_counter()

  run = load_run(a.workdir)
  scorer, judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  labels = balanced_labels(a.num, run.num_classes)
  pred = run.config.diffusion.prediction
  clip = None if a.no_clip else 1.0
  common = {
    "clip_x0": clip,
    "model": run.model,
    "schedule": run.schedule,
    "image_shape": run.image_shape,
    "prediction": pred,
  }
  ddim = make_generate(sampler="ddim", spacing=a.spacing, **common)
  rows = []

  cache = RowCache(
    a.name,
    {
      "workdir": os.path.abspath(a.workdir),
      "judge": os.path.abspath(a.judge),
      "num": a.num,
      "seed": a.seed,
      "clip_x0": clip,
      "spacing": a.spacing,
      "guidance": a.guidance,
      "step": run.step,
    },
  )

  def record(sampler, eta, steps, gen_kwargs, generate):
    key = f"{sampler}/{eta}/{steps}"
    if cache.get(key):
      rows.append(cache.get(key))
      print(f"{key}: reused", flush=True)
      return None
    images, seconds = sample_timed(
      generate, run.params, labels=labels, batch_size=a.batch_size, seed=a.seed, **gen_kwargs
    )
    score = scorer(images, labels)
    row = dict(sampler=sampler, eta=eta, steps=steps, seconds=round(seconds, 2), **score)
    rows.append(row)
    cache.put(key, row)
    report(complete=False)
    print(
      f"{sampler:5s} eta={eta} steps={steps:4d}: FD {score['frechet_distance']:.3f} "
      f"acc {score['class_accuracy']:.3f} P {score['precision']:.3f} R {score['recall']:.3f} ({seconds:.0f}s)",
      flush=True,
    )
    return images

  def report(complete: bool) -> None:
    """Writes the results so far (after every row, so a stopped run still reports what it measured)."""

    def find(sampler, eta, steps):
      return next((r for r in rows if (r["sampler"], r["eta"], r["steps"]) == (sampler, eta, steps)), None)

    checks = {}
    r0, r1 = find("ddim", 0.0, 20), find("ddim", 1.0, 20)
    if r0 and r1:
      checks["ddim_eta0_beats_eta1_at_20_steps"] = r0["frechet_distance"] < r1["frechet_distance"]
    r50, rddpm = find("ddim", 0.0, 50), next((r for r in rows if r["sampler"] == "ddpm"), None)
    if r50 and rddpm:
      checks["ddim50_over_ddpm1000_frechet_ratio"] = round(
        r50["frechet_distance"] / rddpm["frechet_distance"], 3
      )

    result = {
      "command": "python " + " ".join(sys.argv),
      "machine": machine(),
      "workdir": a.workdir,
      "trained_steps": run.step,
      "judge": a.judge,
      "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
      "num_samples": a.num,
      "guidance": a.guidance,
      "clip_x0": clip,
      "spacing": a.spacing,
      "seed": a.seed,
      "complete": complete,
      "rows": rows,
      "checks": checks,
      "wall_s": round(time.perf_counter() - t_start, 1),
    }
    lines = [
      f"# {a.name}: sample quality vs sampling steps (DDIM Table 1 shape)"
      + ("" if complete else " (partial: the run is still going or stopped early)")
      + "\n",
      (
        f"`{result['command']}` on {result['machine']}; {a.num} samples per row (guidance w = {a.guidance:g}; "
        f"{'the unconditional branch' if a.guidance == 0 else 'class-conditional'}), "
        f"same labels and initial noise in every row; predicted x0 clipped to {clip}; DDIM timesteps {a.spacing}; judge held-out accuracy on real images "
        f"{judge_info.get('heldout_accuracy')}. Fréchet distance (FD) on judge features against all "
        f"{scorer.num_reference} real images; lower is better.\n"
      ),
      "| sampler | eta | steps | FD | class accuracy | precision | recall | seconds |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      lines.append(
        f"| {r['sampler']} | {r['eta']:g} | {r['steps']} | {r['frechet_distance']:.3f} | "
        f"{r['class_accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.0f} |"
      )
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in checks.items()]
    write_results(a.name, result, "\n".join(lines) + "\n")

  for eta in a.etas:
    for steps in a.steps:
      images = record("ddim", eta, steps, {"num_steps": steps, "guidance": a.guidance, "eta": eta}, ddim)
      if steps == max(a.steps) and images is not None:
        save_image_grid(
          images[:100], os.path.join("experiments/results", f"{a.name}_ddim_eta{eta:g}.png"), nrow=10
        )
  if not a.no_ddpm:
    T = run.schedule.num_timesteps
    ddpm = make_generate(sampler="ddpm", **common)
    images = record("ddpm", 1.0, T, {"guidance": a.guidance}, ddpm)
    if images is not None:
      save_image_grid(images[:100], os.path.join("experiments/results", f"{a.name}_ddpm.png"), nrow=10)
  report(complete=True)


if __name__ == "__main__":
  main()
