"""Trained diffjax models exported to the diffusers format run in diffusers with the same results.

  python experiments/diffusers_export.py --workdir /work/assets/mnist_ddpm \
      --autoencoder /work/assets/t2i/mnist_ae --judge /work/assets/judges/mnist.safetensors \
      --data-path /work/shared/data/mnist --num 200 --steps 25 --guidance 2

Stable-Diffusion checkpoints cannot be downloaded here, so the real-weights check of
:mod:`diffjax.pretrained` runs the other way round, on models diffjax trained on MNIST:

1. the class-conditional MNIST DDPM U-Net is written as a diffusers ``DDIMPipeline`` directory
   (``UNet2DModel`` + ``DDIMScheduler`` config) by :func:`diffjax.pretrained.export.save_unet2d_pipeline`;
   diffusers (PyTorch) then samples from it with its own ``DDIMScheduler`` and classifier-free guidance,
   and diffjax samples from the same directory (imported back by :func:`load_unet2d` and the scheduler
   config), from the same initial noise and labels; both sample sets are scored by the MNIST judge;
2. the MNIST KL autoencoder is written as an ``AutoencoderKL`` folder and both libraries reconstruct
   the autoencoder run's 500 held-out images.

Writes ``experiments/results/diffusers_export.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import RESULTS, balanced_labels, load_run, load_scorer, machine, write_results

from diffjax.data import to_model_range, to_uint8
from diffjax.guidance import classifier_free_guidance
from diffjax.images import save_image_grid
from diffjax.pretrained.configs import unet2d_config
from diffjax.pretrained.export import save_unet2d_pipeline, save_vae
from diffjax.pretrained.files import read_json
from diffjax.pretrained.loader import load_unet2d, load_vae
from diffjax.pretrained.scheduler import scheduler_from_config
from diffjax.samplers.ddim import ddim_sample
from diffjax.training.autoencoder_loop import load_autoencoder_data
from diffjax.training.autoencoder_restore import load_autoencoder, load_autoencoder_config


def _same_tree(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def sample_diffusers(path: str, x_T: np.ndarray, labels: np.ndarray, *, null: int, steps: int, w: float):
  """CFG DDIM with diffusers' UNet2DModel and DDIMScheduler (eta 0), NHWC in and out."""
  import diffusers
  import torch

  unet = diffusers.UNet2DModel.from_pretrained(os.path.join(path, "unet")).eval()
  sched = diffusers.DDIMScheduler.from_pretrained(os.path.join(path, "scheduler"))
  sched.set_timesteps(steps)
  x = torch.from_numpy(x_T).permute(0, 3, 1, 2)
  y = torch.from_numpy(labels.astype(np.int64))
  y_null = torch.full_like(y, null)
  with torch.no_grad():
    for t in sched.timesteps:
      out = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, y_null])).sample
      c, u = out.chunk(2)
      x = sched.step(u + w * (c - u), t, x).prev_sample
  return x.permute(0, 2, 3, 1).numpy()


def sample_diffjax(path: str, x_T: np.ndarray, labels: np.ndarray, *, null: int, steps: int, w: float):
  """The same sampling with the directory imported by diffjax (jitted DDIM over the scheduler's table)."""
  unet = load_unet2d(os.path.join(path, "unet"))
  sched = scheduler_from_config(read_json(os.path.join(path, "scheduler", "scheduler_config.json")))

  @jax.jit
  def run(params, x, y, table):
    model_fn = lambda p, x, t, c: unet.module.apply({"params": p}, x, t, c)
    guided = classifier_free_guidance(model_fn, guidance_scale=w, null_cond=jnp.full_like(y, null))
    return ddim_sample(
      model_fn=guided, params=params, schedule=sched.schedule, x_T=x, key=jax.random.key(0), cond=y,
      num_steps=steps, prediction=sched.prediction, clip_x0=sched.clip_x0, table=table, eps_from_clipped_x0=False,
    )  # fmt: skip

  return np.asarray(run(unet.params, jnp.asarray(x_T), jnp.asarray(labels), sched.table(steps))), unet


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
  """Pooled PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  return float(10 * np.log10(4.0 / np.mean(np.square(x - ref))))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained class-conditional diffjax work directory")
  p.add_argument("--autoencoder", required=True, help="trained autoencoder work directory")
  p.add_argument("--judge", required=True, help="judge .safetensors trained on the same data")
  p.add_argument("--data-path", default=None, help="overrides the config's data.path")
  p.add_argument("--num", type=int, default=200, help="samples per library")
  p.add_argument("--steps", type=int, default=25, help="DDIM steps")
  p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="runs/diffusers_export", help="where the exported directories go")
  a = p.parse_args()
  t_start = time.perf_counter()

  # 1. The DDPM U-Net.
  run = load_run(a.workdir)
  scorer, _ = load_scorer(a.judge, run, data_path=a.data_path)
  path = os.path.join(a.out_dir, "mnist_ddim")
  d = run.config.diffusion
  save_unet2d_pipeline(
    path, module=run.model, params=run.params, schedule=d.schedule, num_timesteps=d.num_timesteps,
    prediction=d.prediction, sample_size=run.image_shape[0],
  )  # fmt: skip
  labels = balanced_labels(a.num, run.num_classes)
  x_T = np.random.default_rng(a.seed).standard_normal((a.num, *run.image_shape)).astype(np.float32)
  kw = {"null": run.num_classes, "steps": a.steps, "w": a.guidance}
  t0 = time.perf_counter()
  ref = sample_diffusers(path, x_T, labels, **kw)
  t_torch = time.perf_counter() - t0
  t0 = time.perf_counter()
  ours, imported = sample_diffjax(path, x_T, labels, **kw)
  t_jax = time.perf_counter() - t0
  ref_u8, ours_u8 = to_uint8(ref), to_uint8(ours)
  unet_row = {
    # Parameters bit for bit and the same UNet2DModel config (a run's module may hold lists and dtype names
    # where the imported one holds tuples and dtypes: equal models, unequal dataclasses).
    "export_import_exact": _same_tree(imported.params, run.params)
    and unet2d_config(imported.module) == unet2d_config(run.model),
    "max_abs_diff": float(np.abs(ours - ref).max()),
    "mean_abs_diff": float(np.abs(ours - ref).mean()),
    "uint8_pixels_differing": float(np.mean(ref_u8 != ours_u8)),
    "diffusers": {k: v for k, v in scorer(ref_u8, labels).items() if isinstance(v, float)},
    "diffjax": {k: v for k, v in scorer(ours_u8, labels).items() if isinstance(v, float)},
    "seconds_diffusers_torch_cpu": round(t_torch, 1),
    "seconds_diffjax_incl_compile": round(t_jax, 1),
  }
  grid_path = os.path.join(RESULTS, "diffusers_export.png")
  save_image_grid(np.concatenate([ref_u8[:20], ours_u8[:20]]), grid_path, nrow=10)

  # 2. The autoencoder.
  import diffusers
  import torch

  module, params, scale = load_autoencoder(a.autoencoder)
  vae_path = os.path.join(a.out_dir, "mnist_vae")
  save_vae(vae_path, module=module, params=params, scaling_factor=float(scale))
  _, heldout = load_autoencoder_data(load_autoencoder_config(a.autoencoder))
  x = to_model_range(heldout.images)
  tvae = diffusers.AutoencoderKL.from_pretrained(vae_path).eval()
  with torch.no_grad():
    rec_ref = (
      tvae(torch.from_numpy(x).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    )  # posterior mode
  vae = load_vae(vae_path)

  @jax.jit
  def reconstruct(p, x):
    return vae.module.apply({"params": p}, x)[0]

  rec = np.asarray(reconstruct(vae.params, x))
  vae_row = {
    "export_import_exact": _same_tree(vae.params, params),
    "num_images": int(x.shape[0]),
    "scaling_factor": float(scale),
    "max_abs_diff": float(np.abs(rec - rec_ref).max()),
    "psnr_db_diffusers": psnr(rec_ref, x),
    "psnr_db_diffjax": psnr(rec, x),
  }

  result = {
    "workdir": os.path.abspath(a.workdir),
    "checkpoint_step": run.step,
    "autoencoder": os.path.abspath(a.autoencoder),
    "judge": os.path.abspath(a.judge),
    "num": a.num,
    "steps": a.steps,
    "guidance": a.guidance,
    "seed": a.seed,
    "unet_ddim": unet_row,
    "autoencoder_kl": vae_row,
    "machine": machine(),
    "seconds": round(time.perf_counter() - t_start, 1),
  }
  cmd = (
    f"python experiments/diffusers_export.py --workdir {a.workdir} --autoencoder {a.autoencoder} --judge {a.judge}"
    + (f" --data-path {a.data_path}" if a.data_path else "")
    + f" --num {a.num} --steps {a.steps} --guidance {a.guidance}"
  )
  u, v = unet_row, vae_row
  md = f"""# diffjax models exported to diffusers: same samples, same reconstructions

Command: `{cmd}` ({result["seconds"]} s on {result["machine"]}).

Trained diffjax models written in the diffusers format (`diffjax.pretrained.export`) and run by diffusers
0.42 (PyTorch) and by diffjax (importing the written directory), from the same noise and labels.

**MNIST DDPM U-Net** (checkpoint step {result["checkpoint_step"]}; `UNet2DModel` + `DDIMScheduler` config), DDIM {a.steps} steps, eta 0, classifier-free
guidance {a.guidance}, {a.num} samples (labels cycling 0-9); export then import bit-exact:
{u["export_import_exact"]}.

| sampler | max abs diff to diffusers | judge FD | precision | recall | class accuracy |
|---|---|---|---|---|---|
| diffusers DDIMScheduler (torch) | 0 | {u["diffusers"]["frechet_distance"]:.2f} | {u["diffusers"]["precision"]:.3f} | {u["diffusers"]["recall"]:.3f} | {u["diffusers"]["class_accuracy"]:.3f} |
| diffjax DDIM over the imported scheduler config | {u["max_abs_diff"]:.1e} | {u["diffjax"]["frechet_distance"]:.2f} | {u["diffjax"]["precision"]:.3f} | {u["diffjax"]["recall"]:.3f} | {u["diffjax"]["class_accuracy"]:.3f} |

Samples in [-1, 1]; mean abs difference {u["mean_abs_diff"]:.1e}; {100 * u["uint8_pixels_differing"]:.3f}% of the
uint8 pixels differ (by rounding). Grid: `experiments/results/diffusers_export.png` (diffusers rows 1-2,
diffjax rows 3-4).

**MNIST KL autoencoder** (`AutoencoderKL`, scaling factor {v["scaling_factor"]:.3f}) on the run's {v["num_images"]}
held-out 32x32 images, posterior mode: max abs difference of the reconstructions {v["max_abs_diff"]:.1e};
PSNR {v["psnr_db_diffusers"]:.2f} dB (diffusers) vs {v["psnr_db_diffjax"]:.2f} dB (diffjax); export then import
bit-exact: {v["export_import_exact"]}.
"""
  write_results("diffusers_export", json.loads(json.dumps(result)), md)


if __name__ == "__main__":
  main()
