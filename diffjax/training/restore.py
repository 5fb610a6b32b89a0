"""Rebuilding a trained model from a work directory (config.json + latest orbax checkpoint)."""

from __future__ import annotations

import os

import jax
import ml_collections

from diffjax.checkpoints import Checkpointer
from diffjax.training import builders
from diffjax.training.state import create_train_state


def load_trained(
  config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None, ema: bool = True
):
  """Returns (model, schedule, params) restored from ``workdir``'s checkpoint at ``step`` (default: latest)."""
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  tx = builders.build_optimizer(config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"workdir {workdir!r} has no checkpoints/ directory")
  ckpt = Checkpointer(
    ckpt_dir,
    max_to_keep=config.training.keep_checkpoints,
    save_interval_steps=config.training.checkpoint_every,
  )
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {ckpt_dir!r}")
  if step is not None and step not in steps:
    raise ValueError(f"--checkpoint-step {step} not found; available: {sorted(steps)}")
  shape = builders.image_shape(config)
  template = jax.jit(
    lambda k: create_train_state(params=builders.init_params(model, key=k, shape=shape), tx=tx)
  )(jax.random.key(0))
  state = ckpt.restore(template, step=step)
  ckpt.close()
  return model, schedule, (state.ema_params if ema else state.params)
