"""``train_text_to_image(config, workdir)``: text-to-image training on captioned two-digit scenes.

Pixel or latent space (latent diffusion, Rombach et al. 2022, when ``config.latent.autoencoder_workdir``
names a trained autoencoder). Work is done once up front wherever a frozen network allows it: the
captions are encoded once (frozen MiniLM: one ``[L, 384]`` context per distinct caption) and the scenes
are encoded to latents once (posterior modes of the frozen encoder), so a training step costs only the
U-Net (plus the small text encoder when it is trained too).

The work directory is laid out as in :mod:`diffjax.training.loop` (``config.json``, ``metrics.jsonl``
with loss, steps/s and wall clock, orbax checkpoints, sample grids under ``samples/``) plus the
autoencoder copy (:func:`diffjax.training.text_builders.build_codec`); started again on the same
workdir, a run resumes exactly: batch k and the step key depend only on (seed, k).
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffjax import parallel
from diffjax.checkpoints import restore_or_init, training_checkpointer
from diffjax.data import SceneDataset, batch_indices, scene_caption, to_model_range, to_uint8
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.images import save_image_grid
from diffjax.latent import LatentCodec, encode_images
from diffjax.text_conditioning import PromptEncoder
from diffjax.text_sampling import make_text_generate
from diffjax.training import builders
from diffjax.training.step import compile_train_step
from diffjax.training.text_builders import (
  SAMPLE,
  TRAIN,
  TextRun,
  build_scene_data,
  build_text_run,
  root_key,
)
from diffjax.training.text_step import make_text_train_step
from diffjax.training.workdir import MetricsLog, write_config

__all__ = ["CaptionTable", "grid_prompts", "train_text_to_image"]


class CaptionTable:
  """The condition of every distinct caption of a dataset, encoded once.

  Args:
      captions: ``N`` captions (one per example).
      prompts: The prompt encoder.

  Attributes:
      ids: ``int [N]``: row of each example's caption.
      tokens: ``[K, L, ...]``: hidden states (frozen encoder) or token ids (trainable one) per distinct
          caption.
      mask: ``int32 [K, L]``.
  """

  def __init__(self, captions: tuple[str, ...], prompts: PromptEncoder):
    unique, self.ids = np.unique(np.asarray(captions), return_inverse=True)
    self.tokens, self.mask = prompts.encode([str(c) for c in unique])

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``{"tokens", "mask"}`` of examples ``rows``."""
    ids = self.ids[rows]
    return {"tokens": self.tokens[ids], "mask": self.mask[ids]}


def grid_prompts(num: int) -> list[str]:
  """``num`` prompts cycling over ordered digit pairs ``(i, (i + 1 + i // 10) % 10)`` for sample grids."""
  pairs = [(i % 10, (i % 10 + 1 + (i // 10) % 9) % 10) for i in range(num)]
  return [scene_caption(left=a, right=b) for a, b in pairs]


def _diffusion_targets(
  ds: SceneDataset, codec: LatentCodec | None, workdir: str, *, batch_size: int = 256
) -> np.ndarray | None:
  """Latents of every scene, cached in ``workdir`` by data and codec; ``None`` in pixel space."""
  if codec is None:
    return None
  digest = hashlib.sha256(ds.fingerprint().encode())
  for leaf in jax.tree.leaves(jax.device_get(codec.params)):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  digest.update(repr(codec.scaling_factor).encode())
  path = os.path.join(workdir, f"latents_{digest.hexdigest()[:16]}.npy")
  if os.path.isfile(path):
    return np.load(path, allow_pickle=False)
  latents = encode_images(codec, ds.images, batch_size=batch_size)
  np.save(path + ".tmp.npy", latents, allow_pickle=False)
  os.replace(path + ".tmp.npy", path)
  return latents


def train_text_to_image(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) the configured text-to-image model in ``workdir``; returns the last metrics.

  Raises:
      ValueError: On inconsistent settings (batch size, channels, too-long captions).
      FileNotFoundError: If the digits or the autoencoder work directory are missing.
  """
  keep_freed_memory_on_cpu()  # reuse the step's freed temporaries (diffjax.host_memory)
  t_cfg, s_cfg = config.training, config.sample
  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(t_cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(workdir, config)
  train_ds, _ = build_scene_data(config)
  rep = parallel.replicated(mesh)
  ckpt = training_checkpointer(workdir, t_cfg)
  resume = ckpt.latest_step() is not None
  # Resuming restores into a shapes-only template: no initialisation is compiled or run.
  run, fresh = build_text_run(config, workdir=workdir, train_images=train_ds.images, abstract=resume)
  state, start = restore_or_init(
    ckpt, init=lambda: jax.device_put(fresh, rep), template=lambda: fresh, sharding=rep
  )
  log = MetricsLog(workdir, resume_step=start)
  if start >= t_cfg.num_steps:
    ckpt.close()
    return {}

  table = CaptionTable(train_ds.captions, run.prompts)
  latents = _diffusion_targets(train_ds, run.codec, workdir)
  null = run.prompts.null_condition()
  d_cfg = config.diffusion
  step_fn = compile_train_step(
    make_text_train_step(
      unet=run.unet,
      schedule=run.schedule,
      tx=builders.build_optimizer(config),
      null_cond=null,
      text_module=run.prompts.module if run.prompts.trainable else None,
      prediction=d_cfg.prediction,
      weighting=d_cfg.weighting,
      min_snr_gamma=d_cfg.min_snr_gamma,
      cond_drop_prob=t_cfg.cond_drop_prob,
      ema_decay=t_cfg.ema_decay,
    ),
    mesh,
  )
  root = root_key(config)
  train_key = jax.device_put(jax.random.fold_in(root, TRAIN), rep)
  sample_grid = _grid_writer(run, config, workdir, enabled=is_main)

  local = t_cfg.batch_size // jax.process_count()
  lo = jax.process_index() * local

  def get_batch(step: int) -> dict:
    rows = batch_indices(
      num_examples=len(train_ds), global_batch_size=t_cfg.batch_size, step=step, seed=config.seed
    )[lo : lo + local]
    x0 = latents[rows] if latents is not None else to_model_range(train_ds.images[rows])
    return {"x0": x0, **table.gather(rows)}

  num_steps = t_cfg.num_steps
  last: dict = {}
  bar = tqdm(
    total=num_steps, initial=start, desc="train", disable=not (progress and is_main), dynamic_ncols=True
  )
  t_last, s_last = time.perf_counter(), start
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t_last
  pending = []
  for step in range(start, num_steps):
    state, metrics = step_fn(state, parallel.to_global(get_batch(step), mesh), train_key)
    pending.append(metrics)
    done = step + 1
    if done % t_cfg.log_every == 0 or done == num_steps:
      now = time.perf_counter()
      vals = jax.device_get(pending)
      pending = []
      rate = (done - s_last) / max(now - t_last, 1e-9)
      t_last, s_last = now, done
      last = {
        "step": done,
        "loss": float(np.mean([v["loss"] for v in vals])),
        "grad_norm": float(np.mean([v["grad_norm"] for v in vals])),
        "skipped": int(vals[-1]["skipped"]),
        "steps_per_sec": rate,
        "wall_s": wall0 + now,
      }
      if is_main:
        log.write(last)
      bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{rate:.2f}")
    bar.update(1)
    if done % t_cfg.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, state, force=True)
    if s_cfg.every and (done % s_cfg.every == 0 or done == num_steps):
      last["sample_grid"] = sample_grid(state.ema_params, done)
  bar.close()
  ckpt.close()
  return last


def _grid_writer(run: TextRun, config: ml_collections.ConfigDict, workdir: str, *, enabled: bool):
  """``write(params, step) -> path``: a grid of ``sample.num`` scenes for :func:`grid_prompts`.

  The prompts are encoded and the sampler compiled on the first call.
  """
  s = config.sample
  key = jax.random.fold_in(root_key(config), SAMPLE)
  built: dict = {}

  def write(params, step: int) -> str:
    if not built:
      built["cond"] = run.prompts.encode(grid_prompts(s.num))
      built["generate"] = make_text_generate(
        model_fn=run.model_fn,
        schedule=run.schedule,
        sample_shape=run.sample_shape,
        null_cond=run.prompts.null_condition(),
        sampler=s.sampler,
        prediction=config.diffusion.prediction,
        spacing=s.spacing,
        codec=run.codec,
      )
    images = built["generate"](
      params, key, built["cond"], num_steps=s.num_steps, guidance=s.guidance, eta=s.eta
    )
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    if enabled:
      save_image_grid(to_uint8(np.asarray(jax.device_get(images))), path, nrow=10)
    return path

  return write
