"""Train (or resume) a KL-autoencoder config and report held-out reconstruction quality.

  python experiments/autoencoder.py --config configs/mnist_autoencoder.py --name autoencoder_mnist
  python experiments/autoencoder.py --config configs/photos_autoencoder.py --name autoencoder_photos

Writes experiments/results/<name>.json, <name>.md and <name>_recon.png (rows of held-out originals,
each followed by its reconstructions); for the photographs also <name>_strip.png, the whole held-out
strip of each photograph (never seen in training) encoded and decoded in one piece. PSNR is of the
posterior-mode reconstruction against the original 8-bit pixels (peak 255), per image, then averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.config_files import apply_overrides, load_config
from diffjax.data import to_uint8
from diffjax.data.photos import sample_photographs
from diffjax.images import save_image_grid
from diffjax.models import count_params
from diffjax.training.autoencoder_loop import (
  heldout_psnr,
  load_autoencoder_data,
  reconstruct,
  train_autoencoder,
)
from diffjax.training.autoencoder_restore import load_autoencoder, read_latent_stats
from diffjax.training.workdir import MetricsLog

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _psnr(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
  mse = np.mean((a_uint8.astype(np.float64) - b_uint8.astype(np.float64)) ** 2)
  return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def strip_psnr(module, params, config, out_png: str) -> list[dict]:
  """Each photograph's held-out column strip (never seen in training), reconstructed two ways.

  "tiled": cut into the training patch size, each tile encoded and decoded, stitched back; "whole": the
  strip encoded and decoded in one piece, an input 50x larger than any training patch. Saves
  original | tiled | whole side by side, one photograph per row.
  """
  p = config.data.patch_size
  rows, out = [], []
  for i, img in enumerate(sample_photographs()):
    h, w, _ = img.shape
    x0 = round(w * (1.0 - config.data.holdout_fraction))
    strip = img[: h - h % p, x0 : x0 + (w - x0) - (w - x0) % p]
    sh, sw = strip.shape[:2]
    tiles = strip.reshape(sh // p, p, sw // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p, p, 3)
    tiled = to_uint8(reconstruct(module, params, tiles)).reshape(sh // p, sw // p, p, p, 3)
    tiled = tiled.transpose(0, 2, 1, 3, 4).reshape(sh, sw, 3)
    whole = to_uint8(reconstruct(module, params, strip[None], batch_size=1))[0]
    out.append(
      {"photo": i, "shape": [sh, sw], "psnr_tiled": _psnr(strip, tiled), "psnr_whole": _psnr(strip, whole)}
    )
    sep = np.full((sh, 4, 3), 255, np.uint8)
    rows.append(np.concatenate([strip, sep, tiled, sep, whole], axis=1))
  save_image_grid(np.stack(rows), out_png, nrow=1)
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--name", required=True)
  p.add_argument("--workdir", default=None)
  p.add_argument("--override", nargs="*", default=[], help="key=value config overrides")
  a = p.parse_args()
  config = apply_overrides(load_config(a.config), dict(kv.split("=", 1) for kv in a.override))
  workdir = a.workdir or os.path.join("runs", a.name)
  t0 = time.perf_counter()
  train_autoencoder(config, workdir)
  this_call = time.perf_counter() - t0

  module, params, scaling = load_autoencoder(workdir)
  stats = read_latent_stats(workdir)
  train_ds, heldout = load_autoencoder_data(config)
  values = heldout_psnr(module, params, heldout.images, crop=config.eval.get("crop"))
  records = MetricsLog(workdir, resume_step=config.training.num_steps).read()
  train_logs = [r for r in records if "loss" in r]
  evals = [{"step": r["step"], "heldout_psnr": r["heldout_psnr"]} for r in records if "heldout_psnr" in r]
  os.makedirs(RESULTS, exist_ok=True)
  grid = os.path.join(RESULTS, f"{a.name}_recon.png")
  # 32 held-out images evenly spaced over the held-out set (for the photographs: over both strips).
  shown = heldout.images[np.linspace(0, len(heldout) - 1, min(32, len(heldout))).round().astype(int)]
  recon = to_uint8(reconstruct(module, params, shown))
  rows = []
  for i in range(0, len(shown), 16):
    rows += [shown[i : i + 16], recon[i : i + 16]]
  save_image_grid(np.concatenate(rows), grid, nrow=16)
  strips = None
  if config.data.source == "photos":
    strips = strip_psnr(module, params, config, os.path.join(RESULTS, f"{a.name}_strip.png"))

  f = 2 ** (len(config.model.block_out_channels) - 1)
  result = {
    "name": a.name,
    "command": " ".join(["python", "experiments/autoencoder.py", *sys.argv[1:]]),
    "config": config.to_dict(),
    "data": {"train": train_ds.name, "train_examples": len(train_ds), "heldout": heldout.name},
    "image_shape": list(train_ds.image_shape),
    "latent_shape": stats["latent_shape"],
    "downsampling_factor": f,
    "num_params": count_params(params),
    "heldout_examples": len(heldout),
    "heldout_psnr_mean": float(np.mean(values)),
    "heldout_psnr_median": float(np.median(values)),
    "heldout_psnr_p10": float(np.percentile(values, 10)),
    # PSNR of the mean squared error pooled over all held-out pixels (not dominated by flat images).
    "heldout_psnr_pooled": float(10 * np.log10(4.0 / np.mean(4.0 / 10 ** (values / 10)))),
    "psnr_crop": config.eval.get("crop"),
    "heldout_strips": strips,
    "scaling_factor": scaling,
    "latent_stats": stats,
    "train_steps": config.training.num_steps,
    "train_wall_s": train_logs[-1]["wall_s"] if train_logs else None,
    "final_train_rec": train_logs[-1]["rec"] if train_logs else None,
    "final_train_kl_nats": train_logs[-1]["kl"] if train_logs else None,
    "evals": evals,
    "this_call_s": this_call,
    "recon_grid": os.path.relpath(grid, os.path.dirname(os.path.dirname(RESULTS))),
  }
  with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as fh:
    json.dump(result, fh, indent=2, allow_nan=False)
  with open(os.path.join(RESULTS, f"{a.name}.md"), "w") as fh:
    fh.write(markdown(result, config))
  keys = ("heldout_psnr_mean", "heldout_psnr_pooled", "scaling_factor", "train_wall_s")
  print(json.dumps({k: result[k] for k in keys}))


def markdown(r: dict, config) -> str:
  m = config.model
  lines = [
    f"# {r['name']}",
    "",
    f"`{r['command']}`",
    "",
    f"KL autoencoder (diffusers AutoencoderKL layout), block_out_channels={tuple(m.block_out_channels)}, "
    f"layers_per_block={m.layers_per_block}, latent_channels={m.latent_channels}: {r['num_params']:,} parameters. "
    f"Images {tuple(r['image_shape'])} -> latents {tuple(r['latent_shape'])} (f={r['downsampling_factor']}). "
    f"Loss {config.loss.rec_loss} + {config.loss.kl_weight:g} KL"
    + (" + PatchGAN" if config.loss.use_discriminator else "")
    + (f" + {config.loss.perceptual_weight:g} judge-perceptual" if config.loss.perceptual_weight else "")
    + ".",
    "",
    "| quantity | value |",
    "|---|---|",
    (
      f"| training | {r['train_steps']} steps, batch {config.training.batch_size}, {r['data']['train_examples']:,} "
      f"training images: {r['train_wall_s'] / 60:.1f} min wall clock (2 CPU cores shared with other jobs) |"
    ),
    f"| held-out PSNR ({r['heldout_examples']} {r['data']['heldout']}"
    + (f", central {r['psnr_crop']}x{r['psnr_crop']}" if r["psnr_crop"] else "")
    + f") | mean {r['heldout_psnr_mean']:.2f} dB, median {r['heldout_psnr_median']:.2f}, "
    f"10th percentile {r['heldout_psnr_p10']:.2f}; of the pooled MSE {r['heldout_psnr_pooled']:.2f} |",
    (
      f"| latent scaling factor (1 / std of posterior samples, {r['latent_stats']['num_examples']} training images) "
      f"| {r['scaling_factor']:.4f} (std of the means {r['latent_stats']['std_means']:.4f}) |"
    ),
    f"| final training KL | {r['final_train_kl_nats']:.1f} nats per image |",
  ]
  if r["heldout_strips"]:
    for s in r["heldout_strips"]:
      lines.append(
        f"| held-out strip of photograph {s['photo']} ({s['shape'][0]}x{s['shape'][1]}): in training-size tiles "
        f"/ in one piece | {s['psnr_tiled']:.2f} dB / {s['psnr_whole']:.2f} dB |"
      )
  if r["heldout_strips"]:
    lines += [
      "",
      "The strips (`"
      + r["recon_grid"].replace("_recon.png", "_strip.png")
      + "`: original | tiles | one piece) "
      "show that the model, trained on 32x32 patches only, does not carry over to a 50x larger input in one "
      "piece: GroupNorm then normalises over the whole strip and the mid-block attention attends over 848 "
      "instead of 16 positions. Encode large images in training-size tiles (or train on larger crops).",
    ]
  lines += ["", "Held-out PSNR during training (EMA parameters):", "", "| step | PSNR (dB) |", "|---|---|"]
  lines += [f"| {e['step']} | {e['heldout_psnr']:.2f} |" for e in r["evals"]]
  lines += ["", f"Reconstructions (odd rows originals, even rows reconstructions): `{r['recon_grid']}`", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
