"""Rebuilding a trained model from a work directory (config.json + latest orbax checkpoint)."""

from __future__ import annotations

import jax
import ml_collections

from diffjax.checkpoints import restore_saved
from diffjax.training import builders
from diffjax.training.state import create_train_state


def load_trained(
  config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None, ema: bool = True
):
  """Returns (model, schedule, params) restored from ``workdir``'s checkpoint at ``step`` (default: latest).

  Raises:
    FileNotFoundError: If ``workdir`` holds no checkpoint.
    ValueError: If ``step`` (the CLI's ``--checkpoint-step``) is not one of the saved steps.
  """
  model = builders.build_model(config)
  schedule = builders.build_schedule(config)
  tx = builders.build_optimizer(config)
  shape = builders.image_shape(config)
  # Shapes only (nothing compiled or run), placed on the default device like a jitted initialisation.
  template = jax.eval_shape(
    lambda k: create_train_state(params=builders.init_params(model, key=k, shape=shape), tx=tx),
    jax.random.key(0),
  )
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = restore_saved(workdir, template, step=step, sharding=device, what="--checkpoint-step")
  return model, schedule, (state.ema_params if ema else state.params)
