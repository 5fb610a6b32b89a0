"""The resumable loop shared by models trained beside a frozen diffusion model (ControlNet, noisy classifier).

Like :func:`diffjax.training.loop.train_and_evaluate`: the work directory holds ``config.json``,
``metrics.jsonl`` and orbax checkpoints under ``checkpoints/``; started again on the same directory the
run restores the latest checkpoint and continues exactly (batch k and the step's key depend only on
(seed, k)). Single-process; the step is one jitted function with the state donated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffjax.checkpoints import restore_or_init, restore_saved, training_checkpointer
from diffjax.data import ImageDataset, Prefetcher
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.training.state import TrainState
from diffjax.training.workdir import MetricsLog, write_config

__all__ = ["fit", "restore_state"]


def restore_state(workdir: str, template: TrainState, *, step: int | None = None) -> TrainState:
  """Restores a state saved by :func:`fit` into ``template``'s structure (latest step by default).

  Raises:
      FileNotFoundError: If ``workdir`` holds no checkpoint.
      ValueError: If ``step`` is not one of the saved steps.
  """
  return restore_saved(workdir, template, step=step)[0]


def fit(
  *,
  config: ml_collections.ConfigDict,
  workdir: str,
  init_state: Callable[[], TrainState],
  step_fn: Callable,
  train_ds: ImageDataset,
  evaluate: Callable[[TrainState], dict] | None = None,
  progress: bool = True,
) -> dict:
  """Trains (or resumes) ``step_fn`` over ``train_ds`` for ``config.training.num_steps`` steps.

  Args:
      config: Needs ``seed`` and ``training.{batch_size, num_steps, log_every, checkpoint_every,
          keep_checkpoints}`` and ``eval.every`` (0: only at the end).
      workdir: The run's directory.
      init_state: Returns a fresh :class:`TrainState` (also the restore template).
      step_fn: ``(state, batch, key) -> (state, metrics)``; ``batch = {"image": [B, H, W, C] in [-1, 1],
          "label": [B]}``; ``key`` is the same root training key every step.
      train_ds: The training images.
      evaluate: ``state -> dict`` of held-out metrics, logged every ``eval.every`` steps and at the end.
      progress: Show a progress bar.

  Returns:
      The last logged metrics (with the final evaluation).
  """
  keep_freed_memory_on_cpu()  # reuse the step's freed temporaries (diffjax.host_memory)
  t_cfg = config.training
  write_config(workdir, config)
  ckpt = training_checkpointer(workdir, t_cfg)
  state, start = restore_or_init(ckpt, init=init_state)
  log = MetricsLog(workdir, resume_step=start)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  num_steps, eval_every = int(t_cfg.num_steps), int(config.eval.every)
  last: dict = {"step": start}
  bar = tqdm(total=num_steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
  t_last, s_last = time.perf_counter(), start
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t_last
  pending = []
  if start < num_steps:
    with Prefetcher(
      train_ds, start_step=start, seed=config.seed, global_batch_size=t_cfg.batch_size
    ) as batches:
      for step, local in batches:
        if step >= num_steps:
          break
        state, metrics = step_fn(state, local, key)
        pending.append(metrics)
        done = step + 1
        if done % t_cfg.log_every == 0 or done == num_steps:
          now = time.perf_counter()
          vals = jax.device_get(pending)
          pending = []
          rate = (done - s_last) / max(now - t_last, 1e-9)
          t_last, s_last = now, done
          last = {k: float(np.mean([v[k] for v in vals])) for k in vals[0] if k != "skipped"}
          last.update(step=done, skipped=int(vals[-1]["skipped"]), steps_per_sec=rate, wall_s=wall0 + now)
          log.write(last)
          bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{rate:.1f}")
        bar.update(1)
        if evaluate is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
          rec = {"step": done, **evaluate(state)}
          last.update(rec)
          log.write(rec)
        if done % t_cfg.checkpoint_every == 0 or done == num_steps:
          ckpt.save(done, state, force=True)
  bar.close()
  ckpt.close()
  return last
