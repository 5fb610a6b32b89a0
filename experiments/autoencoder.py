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


def strip_psnr(module, params, config, out_png: str) -> list[dict]:
  """Encodes/decodes each photograph's held-out column strip whole; saves original | reconstruction."""
  f = 2 ** (len(config.model.block_out_channels) - 1)
  rows, out = [], []
  for i, img in enumerate(sample_photographs()):
    h, w, _ = img.shape
    x0 = round(w * (1.0 - config.data.holdout_fraction))
    strip = img[: h - h % f, x0 : x0 + (w - x0) - (w - x0) % f][None]
    recon = to_uint8(reconstruct(module, params, strip, batch_size=1))
    value = float(heldout_psnr(module, params, strip, batch_size=1)[0])
    out.append({"photo": i, "shape": list(strip.shape[1:]), "psnr": value})
    rows.append(np.concatenate([strip[0], np.full((strip.shape[1], 4, 3), 255, np.uint8), recon[0]], axis=1))
  save_image_grid(np.stack(rows), out_png, nrow=len(rows))
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
  n = min(32, len(heldout))
  recon = to_uint8(reconstruct(module, params, heldout.images[:n]))
  rows = []
  for i in range(0, n, 16):
    rows += [heldout.images[i : i + 16], recon[i : i + 16]]
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
    "recon_grid": os.path.relpath(grid, os.path.dirname(RESULTS)),
  }
  with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as fh:
    json.dump(result, fh, indent=2, allow_nan=False)
  with open(os.path.join(RESULTS, f"{a.name}.md"), "w") as fh:
    fh.write(markdown(result, config))
  print(json.dumps({k: result[k] for k in ("heldout_psnr_mean", "scaling_factor", "train_wall_s")}))


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
    f"10th percentile {r['heldout_psnr_p10']:.2f} |",
    (
      f"| latent scaling factor (1 / std of posterior samples, {r['latent_stats']['num_examples']} training images) "
      f"| {r['scaling_factor']:.4f} (std of the means {r['latent_stats']['std_means']:.4f}) |"
    ),
    f"| final training KL | {r['final_train_kl_nats']:.1f} nats per image |",
  ]
  if r["heldout_strips"]:
    for s in r["heldout_strips"]:
      lines.append(
        f"| held-out strip of photograph {s['photo']} ({s['shape'][0]}x{s['shape'][1]}, whole) | {s['psnr']:.2f} dB |"
      )
  lines += ["", "Held-out PSNR during training (EMA parameters):", "", "| step | PSNR (dB) |", "|---|---|"]
  lines += [f"| {e['step']} | {e['heldout_psnr']:.2f} |" for e in r["evals"]]
  lines += ["", f"Reconstructions (odd rows originals, even rows reconstructions): `{r['recon_grid']}`", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
