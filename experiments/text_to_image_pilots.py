"""Short text-to-image pilot runs on the two-digit scenes, compared on the metric that matters.

    python experiments/text_to_image_pilots.py --judge J.safetensors [--only a,b] [--steps 600] \
        [--num 200] [--data-path /work/shared/data/mnist] [--autoencoder runs/text/mnist_ae]

Each pilot is ``configs/scenes_text.py`` (its default: latent space, frozen MiniLM) with a few overrides
(``COMMON`` and ``PILOTS`` below), trained for ``--steps`` steps in ``runs/text/pilots/<name>`` (resumable), then
sampled at w = 4 (DDIM-50) for the same ``--num`` prompts and initial noise as every other pilot
(:func:`experiments.text_to_image.eval_prompts`) and judged per half by the MNIST judge: the fraction of
scenes with both digits right and in the stated order, plus each half alone and per caption template.
Finished pilots are cached (``runs/partial/<name>.json``), so pilots can be run one at a time
(``--only``) and the table is rebuilt from all of them. Writes
``experiments/results/text_to_image_pilots.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.config_files import apply_overrides, load_config
from diffjax.data import SCENE_TEMPLATES, judge_scenes, load_dataset, score_scenes
from diffjax.eval import load_judge
from diffjax.images import save_image_grid
from diffjax.training.text_builders import load_text_run
from diffjax.training.text_loop import train_text_to_image
from diffjax.training.workdir import MetricsLog
from experiments.text_to_image import eval_prompts, generate_all, per_template
from experiments.trained_run import RowCache, machine, write_results

# Shared by every pilot: a constant learning rate after warm-up, so that a pilot's steps are exactly the
# first steps of a longer run with the same settings (the winner is continued, not retrained).
COMMON = {"training.lr_decay": "constant", "training.warmup_steps": "100"}
# name -> (what it tests, config overrides on top of configs/scenes_text.py and COMMON).
PILOTS: dict[str, tuple[str, dict[str, str]]] = {
  "base": (
    "previous design: latent 8x16x4, channels (32, 64), no position embedding, lr 1e-3, v + min-SNR-5",
    {"model.position_embedding": "False", "training.learning_rate": "1e-3"},
  ),
  "posemb": (
    "+ 2-D sine-cosine position embedding in the transformers",
    {"model.position_embedding": "True", "training.learning_rate": "1e-3"},
  ),
  "posemb_lr3": (
    "+ position embedding, lr 3e-3",
    {"model.position_embedding": "True", "training.learning_rate": "3e-3"},
  ),
  "posemb_lr3_unweighted": (
    "+ position embedding, lr 3e-3, plain v loss (more weight on high noise than min-SNR)",
    {"model.position_embedding": "True", "training.learning_rate": "3e-3", "diffusion.weighting": "none"},
  ),
}


def _share_latents(workdir: str, root: str) -> None:
  """Copies cached scene latents from sibling pilots (named by a digest of data and codec, so a copy is
  used only when both match): encoding 20,000 scenes once is enough."""
  os.makedirs(workdir, exist_ok=True)
  for sibling in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    src_dir = os.path.join(root, sibling)
    for f in os.listdir(src_dir) if os.path.isdir(src_dir) else []:
      if f.startswith("latents_") and f.endswith(".npy") and not os.path.exists(os.path.join(workdir, f)):
        shutil.copyfile(os.path.join(src_dir, f), os.path.join(workdir, f))


def run_pilot(name: str, overrides: dict[str, str], args, judge, prompts, labels, templates) -> dict:
  config = load_config(args.config)
  config = apply_overrides(
    config,
    {
      "training.num_steps": str(args.steps),
      "sample.every": "0",
      "data.path": args.data_path,
      "latent.autoencoder_workdir": args.autoencoder,
      **COMMON,
      **overrides,
    },
  )
  if config.latent.autoencoder_workdir in ("", "None"):
    config.latent.autoencoder_workdir = None
  workdir = os.path.join(args.workdir_root, name)
  _share_latents(workdir, args.workdir_root)
  t0 = time.perf_counter()
  train_text_to_image(config, workdir, progress=False)
  train_s = time.perf_counter() - t0
  run = load_text_run(workdir)
  images, sample_s = generate_all(
    run, prompts, guidance=args.guidance, steps=args.ddim_steps, batch_size=args.batch_size, seed=args.seed
  )
  predicted = judge_scenes(judge, images)
  save_image_grid(images[:20], os.path.join(workdir, f"pilot_step{run.step}_w{args.guidance:g}.png"), nrow=4)
  history = [r for r in MetricsLog(workdir, resume_step=run.step).read() if "loss" in r]
  return {
    "name": name,
    "what": PILOTS[name][0],
    "overrides": overrides,
    "step": run.step,
    **score_scenes(predicted, labels),
    "per_template_both": per_template(predicted, labels, templates),
    "final_loss": history[-1]["loss"] if history else None,
    "steps_per_sec": float(np.median([r["steps_per_sec"] for r in history[1:]])) if len(history) > 1 else None,
    "train_wall_s_this_call": train_s,
    "sampling_s": sample_s,
  }


def _key(name: str, steps: int) -> str:
  return f"{name}@{steps}:{sorted(PILOTS[name][1].items())}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/scenes_text.py")
  p.add_argument("--judge", default="runs/judges/mnist.safetensors")
  p.add_argument("--data-path", default="../shared/data/mnist")
  p.add_argument("--autoencoder", default="runs/text/mnist_ae")
  p.add_argument("--workdir-root", default="runs/text/pilots")
  p.add_argument("--only", default=None, help="comma-separated pilot names to run (default: all)")
  p.add_argument(
    "--steps", type=int, default=600, help="train each pilot to this step (a finished pilot is continued)"
  )
  p.add_argument("--num", type=int, default=200)
  p.add_argument("--ddim-steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--seed", type=int, default=1234)
  args = p.parse_args()
  names = list(PILOTS) if args.only is None else args.only.split(",")
  unknown = [n for n in names if n not in PILOTS]
  if unknown:
    raise SystemExit(f"error: unknown pilot(s) {unknown}; known: {list(PILOTS)}")

  reference = load_dataset(source="mnist_idx", path=args.data_path, split="test")
  judge, _ = load_judge(args.judge, expected_fingerprint=reference.fingerprint())
  prompts, labels, templates = eval_prompts(args.num, args.seed)
  settings = {k: getattr(args, k) for k in ("config", "judge", "num", "ddim_steps", "guidance", "seed")}
  settings["common"] = COMMON
  cache = RowCache("text_to_image_pilots", settings)
  for name in names:
    key = _key(name, args.steps)
    if cache.get(key) is None:
      cache.put(key, run_pilot(name, PILOTS[name][1], args, judge, prompts, labels, templates))
      print(cache.get(key), flush=True)
  # Every finished row of every pilot (a pilot continued to more steps adds a row: a learning curve).
  rows = sorted(
    (r for k, r in cache.rows.items() if k == _key(r["name"], r["step"]) and r["name"] in PILOTS),
    key=lambda r: (list(PILOTS).index(r["name"]), r["step"]),
  )
  result = {
    "settings": settings,
    "rows": rows,
    "machine": machine(),
    "command": "python experiments/text_to_image_pilots.py " + " ".join(sys.argv[1:]),
  }
  write_results("text_to_image_pilots", result, markdown(result))


def markdown(r: dict) -> str:
  s = r["settings"]
  lines = [
    "# Text-to-image pilots on two-digit MNIST scenes\n",
    f"`{r['command']}`\n",
    (
      f"Each pilot: `{s['config']}` plus `{s['common']}` and the overrides shown, trained to the step shown "
      "(batch 64; a longer row of the same pilot continues the same run), then "
      f"{s['num']} random prompts (uniform ordered digit pairs, random template of five; the same prompts "
      f"and noise for every pilot) sampled with DDIM-{s['ddim_steps']} at guidance w = {s['guidance']:g}; "
      "each 32x32 half judged by the MNIST judge. Wall clock on a CPU shared with other jobs "
      f"({r['machine']}).\n"
    ),
    "| pilot | what | step | both right, in order | left | right | swapped | final loss | steps/s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in r["rows"]:
    swapped = "-" if row["swapped"] is None else f"{row['swapped']:.3f}"
    sps = "-" if row["steps_per_sec"] is None else f"{row['steps_per_sec']:.2f}"
    loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
    lines.append(
      f"| {row['name']} | {row['what']} | {row['step']} | **{row['both']:.3f}** | {row['left']:.3f} | {row['right']:.3f} "
      f"| {swapped} | {loss} | {sps} |"
    )
  lines += ["", "Both right per caption template:", ""]
  lines += ["| pilot | step | " + " | ".join(f"`{t}`" for t in SCENE_TEMPLATES) + " |"]
  lines += ["|---|---|" + "---|" * len(SCENE_TEMPLATES)]
  for row in r["rows"]:
    cells = [f"{row['per_template_both'].get(t, float('nan')):.2f}" for t in SCENE_TEMPLATES]
    lines.append(f"| {row['name']} | {row['step']} | " + " | ".join(cells) + " |")
  lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
