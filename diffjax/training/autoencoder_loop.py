"""``train_autoencoder(config, workdir)``: training, held-out PSNR and the latent scaling factor.

The work directory is laid out as for the diffusion models (:mod:`diffjax.training.loop`):
``config.json``, ``metrics.jsonl`` (loss terms, steps/s, wall clock, held-out PSNR), orbax checkpoints
of one :class:`~diffjax.training.state.TrainState` under ``checkpoints/``; started again on the same
workdir, a run resumes from the latest checkpoint (batch k and the step key depend only on the seed and
k). When training ends it writes ``latent_stats.json``: the latent scaling factor
``1 / std(z)`` over posterior samples of training images (Rombach et al. 2022, Sec. 4.3.2), with the
step and parameters (EMA or raw) it was computed for, and ``reconstructions.png``.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffjax import parallel
from diffjax.checkpoints import restore_or_init, training_checkpointer
from diffjax.data import ImageDataset, Prefetcher, load_dataset, split_holdout, to_model_range
from diffjax.data.photos import load_photo_patches, pad_images
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.images import save_image_grid
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.training.autoencoder_step import (
  PatchDiscriminator,
  make_autoencoder_optimizer,
  make_autoencoder_train_step,
  make_judge_perceptual,
  psnr,
)
from diffjax.training.state import TrainState, create_train_state, make_optimizer
from diffjax.training.workdir import MetricsLog, write_config

__all__ = [
  "LATENT_STATS_FILE",
  "build_autoencoder",
  "compute_latent_stats",
  "heldout_psnr",
  "init_autoencoder_state",
  "load_autoencoder_data",
  "reconstruct",
  "train_autoencoder",
]

LATENT_STATS_FILE = "latent_stats.json"
_INIT, _TRAIN, _STATS = 0, 1, 2


def load_autoencoder_data(config: ml_collections.ConfigDict) -> tuple[ImageDataset, ImageDataset]:
  """``(train, heldout)`` uint8 datasets of ``config.data`` (``source`` "photos" or any image source)."""
  d = config.data
  if d.source == "photos":
    return load_photo_patches(
      patch_size=d.patch_size, num_train=d.num_train, holdout_fraction=d.holdout_fraction, seed=config.seed
    )
  ds = load_dataset(source=d.source, path=d.path, split=d.split, data_dir=d.get("data_dir"))
  if d.get("pad_to"):
    ds = pad_images(ds, d.pad_to)
  return split_holdout(ds, holdout=d.holdout, seed=config.seed)


def build_autoencoder(config: ml_collections.ConfigDict) -> AutoencoderKL:
  """``AutoencoderKL(**config.model)``, with sequences as tuples so the module stays hashable (JSON gives lists)."""
  kwargs = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.model.to_dict().items()}
  return AutoencoderKL(**kwargs)


def _build_discriminator(config) -> PatchDiscriminator | None:
  loss = config.loss
  if not loss.use_discriminator:
    return None
  return PatchDiscriminator(base_channels=loss.disc_base_channels, num_layers=loss.disc_num_layers)


def _build_optimizer(config):
  t = config.training

  def opt(lr):
    return make_optimizer(
      learning_rate=lr,
      warmup_steps=t.warmup_steps,
      total_steps=t.num_steps,
      decay=t.lr_decay,
      weight_decay=t.weight_decay,
      grad_clip=t.grad_clip,
      b1=t.b1,
      b2=t.b2,
    )

  disc = opt(t.disc_learning_rate) if config.loss.use_discriminator else None
  return make_autoencoder_optimizer(opt(t.learning_rate), disc)


def init_autoencoder_state(config: ml_collections.ConfigDict, key: jax.Array, image_shape) -> TrainState:
  """A fresh :class:`TrainState` with params ``{"vae": ...}`` (plus ``"disc"`` with a discriminator)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  k_vae, k_disc = jax.random.split(key)
  params = {"vae": build_autoencoder(config).init(k_vae, x)["params"]}
  disc = _build_discriminator(config)
  if disc is not None:
    params["disc"] = disc.init(k_disc, x)["params"]
  return create_train_state(params=params, tx=_build_optimizer(config))


def _perceptual_fn(config):
  loss = config.loss
  if not loss.perceptual_weight:
    return None
  if not loss.judge_path:
    raise ValueError("config.loss.perceptual_weight > 0 needs config.loss.judge_path (a judge .safetensors)")
  from diffjax.eval.judge_io import load_judge  # Local: only needed with a perceptual term.

  judge_params, info = load_judge(loss.judge_path)
  channels = int(info["image_shape"][-1])
  if channels != config.model.in_channels:
    raise ValueError(
      f"the judge {loss.judge_path!r} takes {channels}-channel images but the autoencoder "
      f"{config.model.in_channels}: a perceptual term needs a judge trained on images like these"
    )
  return make_judge_perceptual(judge_params)


def _batches(images: np.ndarray, batch_size: int):
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    n = len(chunk)
    if n < batch_size:  # Pad the last batch so one compiled shape serves all.
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    yield chunk, n


@functools.partial(jax.jit, static_argnames=("model",))
def _reconstruct_batch(params, x, *, model: AutoencoderKL):
  recon, _ = model.apply({"params": params}, x)
  return jnp.clip(recon, -1.0, 1.0)


def reconstruct(
  model: AutoencoderKL, params, images_uint8: np.ndarray, *, batch_size: int = 64
) -> np.ndarray:
  """Decodes the posterior mode of each image; ``uint8 [N, H, W, C]`` -> float32 ``[N, H, W, C]`` in ``[-1, 1]``."""
  batches = _batches(images_uint8, batch_size)
  out = [np.asarray(_reconstruct_batch(params, to_model_range(b), model=model))[:n] for b, n in batches]
  return np.concatenate(out)


def heldout_psnr(
  model: AutoencoderKL, params, images_uint8: np.ndarray, *, crop: int | None = None, batch_size: int = 64
) -> np.ndarray:
  """PSNR (dB, peak 255) of the mode reconstruction of each image, optionally on the central crop; ``[N]``."""
  recon = reconstruct(model, params, images_uint8, batch_size=batch_size)
  x = to_model_range(images_uint8)
  if crop:
    h, w = x.shape[1:3]
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    x, recon = x[:, y0 : y0 + crop, x0 : x0 + crop], recon[:, y0 : y0 + crop, x0 : x0 + crop]
  return np.asarray(psnr(jnp.asarray(x), jnp.asarray(recon)))


@functools.partial(jax.jit, static_argnames=("model",))
def _encode_batch(params, x, key, *, model: AutoencoderKL):
  post = model.apply({"params": params}, x, method=model.encode)
  return post.sample(key), post.mean


def compute_latent_stats(
  model: AutoencoderKL, params, images_uint8: np.ndarray, *, key: jax.Array, batch_size: int = 64
) -> dict:
  """Statistics of the latents of ``images``; ``scaling_factor = 1 / std`` of the posterior samples.

  Returns:
      JSON-ready dict: ``scaling_factor``, ``std_samples``, ``std_means`` (of the posterior means),
      ``mean``, ``channel_mean`` / ``channel_std`` (of the samples), ``latent_shape``, ``num_examples``.
  """

  samples, means = [], []
  for i, (b, n) in enumerate(_batches(images_uint8, batch_size)):
    z, m = _encode_batch(params, to_model_range(b), jax.random.fold_in(key, i), model=model)
    samples.append(np.asarray(z)[:n])
    means.append(np.asarray(m)[:n])
  z, m = np.concatenate(samples).astype(np.float64), np.concatenate(means).astype(np.float64)
  return {
    "scaling_factor": float(1.0 / z.std()),
    "std_samples": float(z.std()),
    "std_means": float(m.std()),
    "mean": float(z.mean()),
    "channel_mean": [float(v) for v in z.mean(axis=(0, 1, 2))],
    "channel_std": [float(v) for v in z.std(axis=(0, 1, 2))],
    "latent_shape": list(z.shape[1:]),
    "num_examples": len(z),
  }


def _reconstruction_grid(model, params, images_uint8: np.ndarray, path: str, *, per_row: int = 16) -> None:
  """Rows of originals each followed by a row of their reconstructions."""
  from diffjax.data import to_uint8

  recon = to_uint8(reconstruct(model, params, images_uint8))
  rows = []
  for i in range(0, len(images_uint8), per_row):
    rows += [images_uint8[i : i + per_row], recon[i : i + per_row]]
  save_image_grid(np.concatenate(rows), path, nrow=per_row)


_STEP_CACHE: dict = {}


def _compiled_step(config: ml_collections.ConfigDict, mesh):
  """The jitted train step of ``config``, reused by later calls with an identical config (e.g. a restart
  in the same process) so that it is compiled once."""
  cache_key = (json.dumps(config.to_dict(), sort_keys=True, default=str), mesh)
  if cache_key in _STEP_CACHE:
    return _STEP_CACHE[cache_key]
  loss, rep = config.loss, parallel.replicated(mesh)
  step = make_autoencoder_train_step(
    model=build_autoencoder(config),
    tx=_build_optimizer(config),
    discriminator=_build_discriminator(config),
    rec_loss=loss.rec_loss,
    kl_weight=loss.kl_weight,
    perceptual_fn=_perceptual_fn(config),
    perceptual_weight=loss.perceptual_weight,
    disc_weight=loss.disc_weight,
    disc_start=loss.disc_start,
    ema_decay=config.training.ema_decay,
    sample_posterior=loss.sample_posterior,
  )
  fn = jax.jit(
    step, in_shardings=(rep, parallel.data_sharded(mesh), rep), out_shardings=(rep, rep), donate_argnums=(0,)
  )
  _STEP_CACHE.clear()  # Keep only the latest: compiled steps hold memory.
  _STEP_CACHE[cache_key] = fn
  return fn


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) the configured autoencoder in ``workdir``; returns the last logged metrics."""
  keep_freed_memory_on_cpu()  # reuse the step's freed temporaries (diffjax.host_memory)
  t_cfg, e_cfg = config.training, config.eval
  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(t_cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(workdir, config)
  train_ds, heldout_ds = load_autoencoder_data(config)
  shape = train_ds.image_shape
  if shape[-1] != config.model.in_channels:
    raise ValueError(f"config.model.in_channels={config.model.in_channels} but the images are {shape}")
  f = 2 ** (len(config.model.block_out_channels) - 1)
  if shape[0] % f or shape[1] % f:
    raise ValueError(f"images {shape[:2]} must be divisible by the downsampling factor {f}")
  model = build_autoencoder(config)
  root = jax.random.key(config.seed, impl=config.get("rng_impl", "threefry2x32"))
  rep = parallel.replicated(mesh)
  ckpt = training_checkpointer(workdir, t_cfg)

  def init(key):
    return init_autoencoder_state(config, key, shape)

  init_key = jax.random.fold_in(root, _INIT)
  # Resuming needs only the state's structure: skip compiling the initialisers.
  state, start = restore_or_init(
    ckpt,
    init=lambda: jax.jit(init, out_shardings=rep)(init_key),
    template=lambda: jax.eval_shape(init, init_key),
    sharding=rep,
  )
  log = MetricsLog(workdir, resume_step=start)
  step_fn = _compiled_step(config, mesh)
  train_key = jax.device_put(jax.random.fold_in(root, _TRAIN), rep)
  eval_images = heldout_ds.images[: e_cfg.num_examples]

  def eval_params():
    return (state.ema_params if e_cfg.use_ema else state.params)["vae"]

  def evaluate(step: int) -> dict:
    values = heldout_psnr(model, eval_params(), eval_images, crop=e_cfg.get("crop"))
    return {"step": step, "heldout_psnr": float(np.mean(values))}

  num_steps = t_cfg.num_steps
  last: dict = {}
  bar = tqdm(
    total=num_steps, initial=start, desc="train", disable=not (progress and is_main), dynamic_ncols=True
  )
  t_last, s_last = time.perf_counter(), start
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t_last
  pending = []
  with Prefetcher(
    train_ds, start_step=start, seed=config.seed, global_batch_size=t_cfg.batch_size
  ) as batches:
    for step, local in batches:
      if step >= num_steps:
        break
      batch = parallel.to_global({"image": local["image"]}, mesh)
      state, metrics = step_fn(state, batch, train_key)
      pending.append(metrics)
      done = step + 1
      if done % t_cfg.log_every == 0 or done == num_steps:
        now = time.perf_counter()
        vals = jax.device_get(pending)
        pending = []
        rate = (done - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, done
        last = {k: float(np.mean([v[k] for v in vals])) for k in vals[-1] if k != "skipped"}
        last.update(step=done, skipped=int(vals[-1]["skipped"]), steps_per_sec=rate, wall_s=wall0 + now)
        if is_main:
          log.write(last)
        bar.set_postfix(rec=f"{last['rec']:.4f}", psnr=f"{last['psnr']:.1f}", steps_s=f"{rate:.2f}")
      bar.update(1)
      if e_cfg.every and (done % e_cfg.every == 0 or done == num_steps):
        rec = evaluate(done)
        last.update(rec)
        if is_main:
          log.write(rec)
      if done % t_cfg.checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state, force=True)
  bar.close()
  ckpt.close()
  final_step = int(jax.device_get(state.step))
  if "heldout_psnr" not in last:  # e.g. a finished run started again
    last.update(evaluate(final_step))
  stats_path = os.path.join(workdir, LATENT_STATS_FILE)
  if is_main and _stale(stats_path, final_step, e_cfg.use_ema):
    # Evenly spaced over the training set, which may be ordered (photo patches are grouped by photograph).
    n = min(config.latent_stats.num_examples, len(train_ds))
    idx = np.linspace(0, len(train_ds) - 1, n).round().astype(int)
    stats = compute_latent_stats(
      model, eval_params(), train_ds.images[idx], key=jax.random.fold_in(root, _STATS)
    )
    stats.update(step=final_step, params="ema" if e_cfg.use_ema else "raw", data=train_ds.name)
    _write_json(stats_path, stats)
    _reconstruction_grid(
      model, eval_params(), heldout_ds.images[:32], os.path.join(workdir, "reconstructions.png")
    )
  return last


def _stale(path: str, step: int, use_ema: bool) -> bool:
  if not os.path.exists(path):
    return True
  with open(path) as f:
    stats = json.load(f)
  return stats.get("step") != step or stats.get("params") != ("ema" if use_ema else "raw")


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
