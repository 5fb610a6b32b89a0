"""Text-to-image on two-digit scenes: train (or resume), sample at w = 4 and w = 1, judge each half.

    python experiments/text_to_image.py [--config configs/scenes_text.py] [--workdir runs/text/scenes] \
        [--judge runs/judges/mnist.safetensors] [--num 500] [--guidance 4 1] [--no-train]

The prompts are ``--num`` random ordered digit pairs (uniform over the 100 pairs, so one in ten shows
the same digit twice) written with a random template of the five in ``diffjax.data.scenes`` (e.g. "a 3
to the left of a 5", "a five to the right of a three"). The same prompts and initial noise are used for
every guidance weight. Each generated 32x64 scene is cut into its two 32x32 cells, the central 28x28 of
each is classified by the MNIST judge (``python -m diffjax train-judge``; 98.9% held-out accuracy) and
the scene counts as right when both predicted digits equal the stated ones in the stated order
(:func:`diffjax.data.score_scenes`). For reference the same judge scores real held-out scenes (composed
from digits the diffusion model never saw) and, for a latent model, their autoencoder reconstructions.
Writes ``experiments/results/text_to_image.json``, ``.md`` and ``text_to_image_grid_w4.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.config_files import apply_overrides, load_config
from diffjax.data import (
  SCENE_TEMPLATES,
  judge_scenes,
  load_dataset,
  scene_caption,
  score_scenes,
  to_model_range,
  to_uint8,
)
from diffjax.eval import load_judge
from diffjax.images import save_image_grid
from diffjax.text_sampling import make_text_generate
from diffjax.training.text_builders import build_scene_data, load_text_run
from diffjax.training.text_loop import train_text_to_image
from diffjax.training.workdir import MetricsLog
from experiments.trained_run import RESULTS, machine, write_results


def eval_prompts(num: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """``num`` random (left, right) pairs, captions with random templates; returns captions, labels, template ids."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=(num, 2)).astype(np.int32)
  templates = rng.integers(0, len(SCENE_TEMPLATES), size=num)
  captions = [
    scene_caption(left=int(a), right=int(b), template=SCENE_TEMPLATES[t])
    for (a, b), t in zip(labels, templates, strict=True)
  ]
  return captions, labels, templates


def generate_all(run, prompts: list[str], *, guidance: float, steps: int, batch_size: int, seed: int):
  """uint8 scenes for ``prompts`` (batch ``i`` uses ``fold_in(key(seed), i)``) and sampling seconds."""
  generate = make_text_generate(
    model_fn=run.model_fn,
    schedule=run.schedule,
    sample_shape=run.sample_shape,
    null_cond=run.prompts.null_condition(),
    prediction=run.config.diffusion.prediction,
    codec=run.codec,
  )
  cond = run.prompts.encode(prompts)
  key = jax.random.key(seed)
  out, t0 = [], None
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    part = tuple(c[start : start + batch_size] for c in cond)
    if t0 is None:  # compile outside the clock
      jax.block_until_ready(generate(run.params, key, part, num_steps=1, guidance=guidance))
      t0 = time.perf_counter()
    out.append(
      jax.device_get(
        generate(run.params, jax.random.fold_in(key, i), part, num_steps=steps, guidance=guidance)
      )
    )
  return to_uint8(np.concatenate(out)), time.perf_counter() - t0


def per_template(predicted: np.ndarray, labels: np.ndarray, templates: np.ndarray) -> dict:
  return {
    SCENE_TEMPLATES[t]: score_scenes(predicted[templates == t], labels[templates == t])["both"]
    for t in range(len(SCENE_TEMPLATES))
    if np.any(templates == t)
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/scenes_text.py")
  p.add_argument("--workdir", default="runs/text/scenes")
  p.add_argument("--judge", default="runs/judges/mnist.safetensors")
  p.add_argument("--data-path", default=None, help="MNIST IDX directory (default: the config's)")
  p.add_argument("--num", type=int, default=500)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--guidance", type=float, nargs="+", default=[4.0, 1.0])
  p.add_argument("--seed", type=int, default=1234)
  p.add_argument("--no-train", action="store_true", help="evaluate the workdir as it is")
  p.add_argument("--name", default="text_to_image")
  args, rest = p.parse_known_args()
  overrides = dict(item[len("--config.") :].split("=", 1) for item in rest if item.startswith("--config."))
  config = apply_overrides(load_config(args.config), overrides)
  if args.data_path:
    config.data.path = args.data_path

  if not args.no_train:
    train_text_to_image(config, args.workdir)
  run = load_text_run(args.workdir)
  config = run.config
  reference = load_dataset(
    source=config.data.source, path=args.data_path or config.data.path, split=config.data.split
  )
  judge, judge_info = load_judge(args.judge, expected_fingerprint=reference.fingerprint())

  _, heldout = build_scene_data(config)
  real = score_scenes(judge_scenes(judge, heldout.images), heldout.labels)
  recon = None
  if run.codec is not None:
    z = run.codec.encode(to_model_range(heldout.images))
    recon = score_scenes(judge_scenes(judge, to_uint8(np.asarray(run.codec.decode(z)))), heldout.labels)

  prompts, labels, templates = eval_prompts(args.num, args.seed)
  rows = []
  grid_images = None
  for w in args.guidance:
    images, seconds = generate_all(
      run, prompts, guidance=w, steps=args.steps, batch_size=args.batch_size, seed=args.seed
    )
    predicted = judge_scenes(judge, images)
    score = score_scenes(predicted, labels)
    rows.append(
      {
        "guidance": w,
        **score,
        "per_template_both": per_template(predicted, labels, templates),
        "sampling_s": seconds,
      }
    )
    if grid_images is None or w == 4.0:
      grid_images, grid_w, grid_pred = images, w, predicted
    print(json.dumps(rows[-1]))

  n_grid = min(40, args.num)
  grid_path = os.path.join(RESULTS, f"{args.name}_grid_w{grid_w:g}.png")
  save_image_grid(grid_images[:n_grid], grid_path, nrow=4)
  history = MetricsLog(args.workdir, resume_step=run.step).read()
  train_records = [r for r in history if "loss" in r]
  result = {
    "workdir": args.workdir,
    "step": run.step,
    "space": "latent" if run.codec is not None else "pixel",
    "sample_shape": list(run.sample_shape),
    "text_encoder": config.text.encoder,
    "num_prompts": args.num,
    "ddim_steps": args.steps,
    "rows": rows,
    "real_heldout_scenes": real,
    "autoencoder_reconstructions": recon,
    "judge": args.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "train_wall_s": max((r.get("wall_s", 0.0) for r in train_records), default=None),
    "train_curve": [
      {"step": r["step"], "loss": r["loss"], "steps_per_sec": r["steps_per_sec"]} for r in train_records
    ],
    "grid": os.path.relpath(grid_path, os.path.dirname(RESULTS)),
    "grid_prompts": prompts[:n_grid],
    "grid_judged": grid_pred[:n_grid].tolist(),
    "machine": machine(),
    "command": "python experiments/text_to_image.py " + " ".join(sys.argv[1:]),
  }
  write_results(args.name, result, markdown(result, config))


def markdown(r: dict, config) -> str:
  lines = [
    "# Text-to-image on two-digit MNIST scenes\n",
    (f"Model: {r['space']}-space cross-attention U-Net (diffusers UNet2DConditionModel layout, channels "
    f"{tuple(config.model.block_out_channels)}, transformers at levels {tuple(config.model.cross_attention_levels)}) "
    f"diffusing {'x'.join(map(str, r['sample_shape']))}, text encoder {r['text_encoder']} "
    f"(frozen all-MiniLM-L6-v2 when 'minilm'), caption dropout {config.training.cond_drop_prob} to \"\". "
    f"Trained {r['step']} steps of batch {config.training.batch_size} on {config.data.num_scenes} scenes "
    f"in {r['train_wall_s'] / 60:.1f} min wall clock ({r['machine']}, shared with other jobs).\n"),
    (f"Measured on {r['num_prompts']} random prompts (uniform ordered digit pairs, random template of five), "
    f"DDIM-{r['ddim_steps']}, same prompts and noise for every w. Each scene is cut into its two 32x32 "
    "cells; the MNIST judge classifies the central 28x28 of each; a scene is right when both digits are "
    "the stated ones in the stated order.\n"),
    "| guidance w | both right, in order | left right | right right | swapped (distinct pairs) | sampling s |",
    "|---|---|---|---|---|---|",
  ]
  for row in r["rows"]:
    swapped = "-" if row["swapped"] is None else f"{row['swapped']:.3f}"
    lines.append(
      f"| {row['guidance']:g} | **{row['both']:.3f}** | {row['left']:.3f} | {row['right']:.3f} | {swapped} "
      f"| {row['sampling_s']:.0f} |"
    )
  lines += ["", "Per caption template, both right at each w:", ""]
  lines += ["| template | " + " | ".join(f"w={row['guidance']:g}" for row in r["rows"]) + " |"]
  lines += ["|---|" + "---|" * len(r["rows"])]
  for t in r["rows"][0]["per_template_both"]:
    lines.append(f"| `{t}` | " + " | ".join(f"{row['per_template_both'][t]:.3f}" for row in r["rows"]) + " |")
  lines += [
    "",
    f"Reference, same judge: real held-out scenes {r['real_heldout_scenes']['both']:.3f} both right"
    + (
      f"; their autoencoder reconstructions {r['autoencoder_reconstructions']['both']:.3f}."
      if r["autoencoder_reconstructions"]
      else "."
    ),
    "",
    "Training loss (every 50 steps): "
    + ", ".join(
      f"{c['step']}: {c['loss']:.3f}" for c in r["train_curve"][:: max(1, len(r["train_curve"]) // 15)]
    ),
    "",
    f"Grid `{r['grid']}` (rows of 4, read left to right; judged digits in brackets):",
    "",
  ]
  for i, (prompt, judged) in enumerate(zip(r["grid_prompts"], r["grid_judged"], strict=True)):
    lines.append(f"{i + 1}. {prompt} [{judged[0]} | {judged[1]}]")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
