"""``train_and_evaluate(config, workdir)``: the training loop of every pixel-space config.

The work directory holds config.json, metrics.jsonl, orbax checkpoints under ``checkpoints/`` and
sample grids under ``samples/``. Started again on the same workdir, a run restores the latest
checkpoint and continues exactly: batch k and the step's PRNG key depend only on (seed, k). The loop
never synchronises with the device except every ``log_every`` steps and at evaluation/sampling.
"""

from __future__ import annotations

import os
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffjax import parallel
from diffjax.checkpoints import restore_or_init, training_checkpointer
from diffjax.data import Prefetcher, to_model_range, to_uint8
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.images import save_image_grid
from diffjax.losses import nll_bits_per_dim
from diffjax.samplers.timesteps import check_num_steps
from diffjax.sampling import make_generate
from diffjax.training import builders
from diffjax.training.state import create_train_state
from diffjax.training.step import compile_train_step, make_model_fn, make_train_step
from diffjax.training.workdir import MetricsLog, read_config, write_config

# Fixed sub-streams of the run's one root key.
_INIT, _TRAIN, _SAMPLE, _EVAL = 0, 1, 2, 3


def make_eval_bpd(*, model, schedule, prediction: str, num_t_samples: int | None):
  """Jitted ``eval_bpd(params, images, labels, key) -> bits/dim [B]`` (labels may be None)."""
  model_fn = make_model_fn(model, train=False)

  @jax.jit
  def eval_bpd(params, images, labels, key):
    return nll_bits_per_dim(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x0=images,
      cond=labels,
      key=key,
      prediction=prediction,
      num_t_samples=num_t_samples,
    )["bpd"]

  return eval_bpd


def _sample_labels(num_classes: int | None, n: int) -> np.ndarray:
  return np.arange(n) % (num_classes or 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) the configured model in ``workdir``; returns the last logged metrics."""
  dist = config.distributed
  parallel.maybe_initialize_distributed(
    enabled=dist.initialize,
    coordinator_address=dist.coordinator_address,
    num_processes=dist.num_processes,
    process_id=dist.process_id,
  )
  # XLA:CPU allocates and frees a step's temporaries at every step; keeping freed heap memory makes
  # the next step reuse mapped pages (1.2-1.4x steps/s, experiments/results/bench_cpu_paths.md).
  keep_freed_memory_on_cpu()
  t_cfg = config.training
  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(t_cfg.batch_size, mesh)
  if t_cfg.batch_size % jax.process_count():
    raise ValueError(
      f"batch_size={t_cfg.batch_size} must be divisible by the process count ({jax.process_count()})"
    )
  is_main = jax.process_index() == 0
  previous = read_config(workdir) if os.path.exists(os.path.join(workdir, "config.json")) else None
  if is_main:
    write_config(workdir, config)

  train_ds, heldout_ds = builders.load_data(config)
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  tx = builders.build_optimizer(config)
  shape = builders.image_shape(config)
  root = jax.random.key(config.seed)
  rep = parallel.replicated(mesh)

  def init(key):
    return create_train_state(params=builders.init_params(model, key=key, shape=shape), tx=tx)

  ckpt = training_checkpointer(workdir, t_cfg)
  state, start = restore_or_init(
    ckpt, init=lambda: jax.jit(init, out_shardings=rep)(jax.random.fold_in(root, _INIT))
  )
  log = MetricsLog(workdir, resume_step=start)
  change = builders.lr_schedule_change(previous, config, step=start) if previous and start else None
  if change and is_main:
    warnings.warn(change, RuntimeWarning, stacklevel=2)

  d_cfg = config.diffusion
  step_fn = compile_train_step(
    make_train_step(
      model=model,
      schedule=schedule,
      tx=tx,
      prediction=d_cfg.prediction,
      weighting=d_cfg.weighting,
      min_snr_gamma=d_cfg.min_snr_gamma,
      cond_drop_prob=t_cfg.cond_drop_prob,
      ema_decay=t_cfg.ema_decay,
      class_conditional=model.num_classes is not None,
    ),
    mesh,
  )
  train_key = jax.device_put(jax.random.fold_in(root, _TRAIN), rep)

  s_cfg = config.sample
  if s_cfg.sampler == "ddim":
    check_num_steps(s_cfg.num_steps, schedule.num_timesteps)
  generate = make_generate(
    model=model,
    schedule=schedule,
    image_shape=shape,
    sampler=s_cfg.sampler,
    prediction=d_cfg.prediction,
    spacing=s_cfg.spacing,
  )
  eval_bpd = make_eval_bpd(
    model=model, schedule=schedule, prediction=d_cfg.prediction, num_t_samples=config.eval.num_t_samples
  )
  n_eval = min(config.eval.num_examples, len(heldout_ds))
  eval_images = jnp.asarray(to_model_range(heldout_ds.images[:n_eval]))
  eval_labels = None if model.num_classes is None else jnp.asarray(heldout_ds.labels[:n_eval])

  def evaluate(step: int) -> dict:
    bpd = eval_bpd(state.ema_params, eval_images, eval_labels, jax.random.fold_in(root, _EVAL))
    return {"step": step, "eval_bpd": float(jnp.mean(bpd))}

  def sample_grid(step: int) -> str:
    labels = _sample_labels(model.num_classes, s_cfg.num)
    imgs = generate(
      state.ema_params,
      jax.random.fold_in(root, _SAMPLE),
      labels,
      num_steps=s_cfg.num_steps,
      guidance=s_cfg.guidance,
      eta=s_cfg.eta,
    )
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    if is_main:
      save_image_grid(to_uint8(np.asarray(jax.device_get(imgs))), path, nrow=model.num_classes or None)
    return path

  num_steps = t_cfg.num_steps
  last: dict = {}
  if start == 0 and config.eval.every and is_main:
    log.write(evaluate(0))
  bar = tqdm(
    total=num_steps, initial=start, desc="train", disable=not (progress and is_main), dynamic_ncols=True
  )
  t_last, s_last = time.perf_counter(), start
  # Wall-clock seconds of training so far, carried across resumes through metrics.jsonl.
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t_last
  pending = []
  with Prefetcher(
    train_ds,
    start_step=start,
    seed=config.seed,
    global_batch_size=t_cfg.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ) as batches:
    for step, local in batches:
      if step >= num_steps:
        break
      state, metrics = step_fn(state, parallel.to_global(local, mesh), train_key)
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
        bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{rate:.1f}")
      bar.update(1)
      if config.eval.every and (done % config.eval.every == 0 or done == num_steps):
        rec = evaluate(done)
        last.update(rec)
        if is_main:
          log.write(rec)
      if done % t_cfg.checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state, force=True)
      if s_cfg.every and (done % s_cfg.every == 0 or done == num_steps):
        last["sample_grid"] = sample_grid(done)
  bar.close()
  ckpt.close()
  return last
