"""Cost per step of latent vs pixel diffusion at the same output resolution (32x64 two-digit scenes).

    python experiments/latent_cost.py [--config configs/scenes_text.py] [--autoencoder runs/text/mnist_ae] \
        [--batch 16] [--reps 5]

Compares the text-conditioned U-Net of ``configs/scenes_text.py`` (channels (c0, c1), transformers at
both levels) diffusing 8x16x4 latents of the f = 4 MNIST autoencoder with pixel-space U-Nets producing
the same 32x64x1 scenes:

* ``pixel_same``: the same U-Net on pixels, i.e. with self-attention over 2048 and 512 tokens instead of
  128 and 32;
* ``pixel_deep``: a pixel U-Net with two extra resolution levels in front (channels (c0, c0, c0, c1),
  transformers only at the two lowest levels, 8x16 and 4x8), the usual way to afford attention in pixel
  space.

For each it reports XLA's cost analysis (FLOPs of the compiled computation) and the measured time of a
training step (forward, backward, AdamW) and of a sampling step (one classifier-free-guided U-Net
evaluation: conditional and null prompt in one batch of 2B), at the same batch size B. The latent model
also pays once per sample for decoding (and, were latents not precomputed, once per training image for
encoding); both are reported separately. Times are the minimum over ``--reps`` runs after compilation
(the machine is shared, so the minimum is the least disturbed estimate); the FLOPs are exact.
Writes ``experiments/results/latent_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.config_files import load_config
from diffjax.guidance import classifier_free_guidance
from diffjax.latent import LatentCodec
from diffjax.models.params import count_params
from diffjax.models.unet_condition import UNetCondition
from diffjax.schedules import make_schedule
from diffjax.text_conditioning import make_text_model_fn
from diffjax.training.autoencoder_restore import load_autoencoder
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.text_step import make_text_train_step
from experiments.trained_run import machine, write_results

CONTEXT = (16, 384)  # MiniLM: 16 tokens of width 384


def model_variants(config_path: str) -> dict:
  """The config's latent U-Net and its two pixel-space counterparts (see the module docstring)."""
  base = load_config(config_path).model.to_dict()
  c0, c1 = base["block_out_channels"][0], base["block_out_channels"][-1]
  pixel = {**base, "in_channels": 1, "out_channels": 1}
  return {
    "latent": (base, (8, 16, base["in_channels"])),
    "pixel_same": (pixel, (32, 64, 1)),
    "pixel_deep": (
      {**pixel, "block_out_channels": (c0, c0, c0, c1), "cross_attention_levels": (False, False, True, True)},
      (32, 64, 1),
    ),
  }


def flops(compiled) -> float:
  """FLOPs from XLA's cost analysis of a compiled computation."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost["flops"])


def best_time(fn, *args, reps: int) -> float:
  """Minimum wall-clock seconds of ``fn(*args)`` over ``reps`` runs (after one warm-up run)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def measure(name: str, kwargs: dict, shape: tuple, batch: int, reps: int) -> dict:
  unet = UNetCondition(**kwargs)
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, *shape))
  ctx = jax.random.normal(key, (batch, *CONTEXT))
  mask = jnp.ones((batch, CONTEXT[0]), jnp.int32)
  params = unet.init(key, x[:1], jnp.zeros(1), ctx[:1], mask[:1])["params"]
  schedule = make_schedule("linear", num_timesteps=1000)
  tx = make_optimizer(learning_rate=1e-3)
  state = create_train_state(params=params, tx=tx)
  null = (jnp.zeros((1, *CONTEXT)), jnp.ones((1, CONTEXT[0]), jnp.int32))
  step = jax.jit(make_text_train_step(unet=unet, schedule=schedule, tx=tx, null_cond=null))
  batch_d = {"x0": x, "tokens": ctx, "mask": mask}
  train_c = step.lower(state, batch_d, key).compile()
  guided = classifier_free_guidance(
    make_text_model_fn(unet),
    guidance_scale=4.0,
    null_cond=jax.tree.map(lambda n: jnp.repeat(n, batch, 0), null),
  )
  sample = jax.jit(guided)
  t = jnp.full((batch,), 500)
  sample_c = sample.lower(params, x, t, (ctx, mask)).compile()
  return {
    "model": name,
    "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
    "diffused_shape": list(shape),
    "params": count_params(params),
    "train_step_gflops": flops(train_c) / 1e9,
    "sample_step_gflops": flops(sample_c) / 1e9,
    "train_step_s": best_time(train_c, state, batch_d, key, reps=reps),
    "sample_step_s": best_time(sample_c, params, x, t, (ctx, mask), reps=reps),
  }


def measure_codec(workdir: str, batch: int, reps: int) -> dict:
  codec = LatentCodec(*load_autoencoder(workdir))
  images = jnp.zeros((batch, 32, 64, 1))
  latents = jnp.zeros((batch, 8, 16, 4))
  enc = jax.jit(lambda c, x: c.encode(x)).lower(codec, images).compile()
  dec = jax.jit(lambda c, z: c.decode(z)).lower(codec, latents).compile()
  return {
    "autoencoder": workdir,
    "autoencoder_params": count_params(codec.params),
    "encode_gflops": flops(enc) / 1e9,
    "decode_gflops": flops(dec) / 1e9,
    "encode_s": best_time(enc, codec, images, reps=reps),
    "decode_s": best_time(dec, codec, latents, reps=reps),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/scenes_text.py", help="its model is the latent U-Net")
  p.add_argument("--autoencoder", default="runs/text/mnist_ae")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--name", default="latent_cost")
  args = p.parse_args()
  rows = {
    name: measure(name, kwargs, shape, args.batch, args.reps)
    for name, (kwargs, shape) in model_variants(args.config).items()
  }
  codec = measure_codec(args.autoencoder, args.batch, args.reps)
  lat = rows["latent"]
  for r in rows.values():
    for k in ("train_step_gflops", "sample_step_gflops", "train_step_s", "sample_step_s"):
      r[f"{k}_vs_latent"] = r[k] / lat[k]
  steps = 50
  sample_total = {
    name: {
      "gflops": steps * r["sample_step_gflops"] + (codec["decode_gflops"] if name == "latent" else 0.0),
      "s": steps * r["sample_step_s"] + (codec["decode_s"] if name == "latent" else 0.0),
    }
    for name, r in rows.items()
  }
  result = {
    "batch": args.batch,
    "context": list(CONTEXT),
    "models": rows,
    "codec": codec,
    "sample_50_steps_with_decode": sample_total,
    "machine": machine(),
    "command": "python experiments/latent_cost.py " + " ".join(sys.argv[1:]),
  }
  lines = [
    "# Latent vs pixel diffusion: cost per step at the same output resolution (32x64 scenes)\n",
    (
      f"Batch {args.batch}, context 16 x 384 (MiniLM), {machine()}; times are the minimum of {args.reps} "
      "runs after compilation on a CPU shared with other jobs, FLOPs from XLA's cost analysis.\n"
    ),
    (
      "| model | diffuses | params | train step GFLOPs | train step s | sample step GFLOPs (CFG, 2B) "
      "| sample step s | train FLOPs / latent | sample FLOPs / latent | train time / latent "
      "| sample time / latent |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows.values():
    lines.append(
      f"| {r['model']} | {'x'.join(map(str, r['diffused_shape']))} | {r['params']:,} "
      f"| {r['train_step_gflops']:.2f} | {r['train_step_s']:.3f} | {r['sample_step_gflops']:.2f} "
      f"| {r['sample_step_s']:.3f} | {r['train_step_gflops_vs_latent']:.1f} "
      f"| {r['sample_step_gflops_vs_latent']:.1f} | {r['train_step_s_vs_latent']:.1f} "
      f"| {r['sample_step_s_vs_latent']:.1f} |"
    )
  lines += [
    "",
    (
      f"Autoencoder ({codec['autoencoder_params']:,} params): encode {codec['encode_gflops']:.2f} GFLOPs / "
      f"{codec['encode_s']:.3f} s, decode {codec['decode_gflops']:.2f} GFLOPs / {codec['decode_s']:.3f} s "
      f"per batch of {args.batch}. Encoding is done once per training image before training (latents are "
      "precomputed), decoding once per sample after the last step."
    ),
    "",
    "50-step DDIM with guidance, batch total (latent includes one decode): "
    + ", ".join(f"{n} {v['gflops']:.0f} GFLOPs / {v['s']:.1f} s" for n, v in sample_total.items())
    + ".",
    "",
  ]
  write_results(args.name, result, "\n".join(lines))


if __name__ == "__main__":
  main()
