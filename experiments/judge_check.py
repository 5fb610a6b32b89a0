"""Is the judge a sound ruler? Accuracy on held-out real images and its metrics on real vs real vs noise.

  python -m diffjax train-judge --source mnist_idx --path ../shared/data/mnist --split test \
      --out runs/judges/mnist.safetensors --steps 2000
  python experiments/judge_check.py --judge runs/judges/mnist.safetensors --source mnist_idx \
      --path ../shared/data/mnist --split test --name judge_mnist

Scores, with the judge's features: two disjoint random halves of the real data against each other (the
Fréchet distance should be near 0, precision and recall near 1), uniform noise and Gaussian-blurred
real images against the real data (far worse), and reports the judge's accuracy on the images held out
from its training. Precision/recall use k = 3 neighbours as in Kynkäänniemi et al. 2019; with finite
samples real vs real stays a little below 1 (a real point can fall outside the k-NN balls of the other
half). The "real" half B mostly holds images the judge was trained on, so its class accuracy is not a
held-out figure; the held-out accuracy is the judge's own. Writes ``experiments/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import machine, write_results

from diffjax.data import load_dataset
from diffjax.eval import load_judge
from diffjax.eval.metrics import SampleScorer


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--judge", required=True)
  p.add_argument("--source", default="mnist_idx")
  p.add_argument("--path", default=None)
  p.add_argument("--split", default="test")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="judge_check")
  a = p.parse_args()
  t0 = time.perf_counter()
  data = load_dataset(source=a.source, path=a.path, split=a.split)
  params, info = load_judge(a.judge, expected_fingerprint=data.fingerprint())
  perm = np.random.default_rng(a.seed).permutation(len(data))
  half_a, half_b = data.subset(perm[: len(data) // 2]), data.subset(perm[len(data) // 2 :])
  scorer = SampleScorer(judge_params=params, judge_info=info, reference=half_a)
  rng = np.random.default_rng(a.seed + 1)
  noise = rng.integers(0, 256, size=half_b.images.shape, dtype=np.uint8)
  blurred = ndimage.gaussian_filter(half_b.images.astype(np.float32), sigma=(0, 1.5, 1.5, 0))
  blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
  rows = {
    "real half B vs real half A": scorer(half_b.images, half_b.labels),
    "blurred half B (sigma 1.5 px) vs real half A": scorer(blurred, half_b.labels),
    "uniform noise vs real half A": scorer(noise, half_b.labels),
  }
  real, noisy = rows["real half B vs real half A"], rows["uniform noise vs real half A"]
  checks = {
    "judge_heldout_accuracy": info["heldout_accuracy"],
    "heldout_accuracy_at_least_0.98": bool(info["heldout_accuracy"] >= 0.98),
    "real_vs_real_frechet_over_noise_frechet": real["frechet_distance"] / noisy["frechet_distance"],
    "real_vs_real_min_precision_recall": min(real["precision"], real["recall"]),
  }
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "judge": a.judge,
    "judge_info": info,
    "data": data.name,
    "num_per_half": [len(half_a), len(half_b)],
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t0, 1),
  }
  lines = [
    f"# {a.name}: the judge on real data\n",
    (
      f"`{result['command']}` on {result['machine']}. Judge trained on {info['num_train']} images of "
      f"{info['data_name']}, accuracy {info['heldout_accuracy']:.4f} on its {info['num_heldout']} held-out "
      f"images. The real data split into two disjoint random halves of {len(half_a)} and {len(half_b)}.\n"
    ),
    "| compared | Fréchet distance | precision | recall | class accuracy |",
    "|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['frechet_distance']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
      f"{r['class_accuracy']:.3f} |"
    )
  lines.append("")
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
