"""Loading a trained autoencoder from its work directory: for latent diffusion and evaluation.

module, params, scaling_factor = load_autoencoder("runs/mnist_autoencoder")
encode, decode = make_codec(module, scaling_factor=scaling_factor)
z = encode(params, images)            # [B, H/f, W/f, c], about unit variance
x = decode(params, z)                 # [B, H, W, C] in [-1, 1]
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from diffjax.checkpoints import restore_saved
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.training.autoencoder_loop import LATENT_STATS_FILE, build_autoencoder, init_autoencoder_state
from diffjax.training.workdir import read_config

__all__ = ["load_autoencoder", "load_autoencoder_config", "read_latent_stats"]


def load_autoencoder_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` of an autoencoder work directory."""
  config = read_config(workdir)
  if "loss" not in config or "latent_channels" not in config.model:
    raise ValueError(
      f"workdir {workdir!r} does not hold an autoencoder run (config.json has no loss/latent_channels)"
    )
  return config


def read_latent_stats(workdir: str) -> dict:
  """``latent_stats.json`` (scaling factor and latent statistics) of a finished run."""
  path = os.path.join(workdir, LATENT_STATS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} does not exist: it is written when training finishes")
  with open(path) as f:
    return json.load(f)


def load_autoencoder(
  workdir: str, *, step: int | None = None, ema: bool | None = None
) -> tuple[AutoencoderKL, dict, float]:
  """The module, its parameters and the latent scaling factor of a trained autoencoder.

  Args:
      workdir: A work directory written by :func:`~diffjax.training.autoencoder_loop.train_autoencoder`.
      step: Checkpoint step (default: the latest).
      ema: EMA (True) or raw (False) parameters; default: those the run evaluated with
          (``config.eval.use_ema``), which are the ones the scaling factor was computed for.

  Returns:
      ``(module, params, scaling_factor)``; ``params`` is the ``"params"`` tree of the module.

  Raises:
      FileNotFoundError: No config, checkpoint or latent statistics.
      ValueError: ``step`` is not one of the saved steps, or the statistics were computed for another
          step or parameter set than the ones loaded.
  """
  config = load_autoencoder_config(workdir)
  use_ema = config.eval.use_ema if ema is None else ema
  # Parameter shapes do not depend on the image size (all layers are convolutions); the template needs
  # only shapes, and eval_shape avoids compiling the initialisers.
  side = max(32, 4 * 2 ** (len(config.model.block_out_channels) - 1))
  shape = (side, side, config.model.in_channels)
  template = jax.eval_shape(lambda k: init_autoencoder_state(config, k, shape), jax.random.key(0))
  state, step = restore_saved(workdir, template, step=step)
  params = (state.ema_params if use_ema else state.params)["vae"]
  stats = read_latent_stats(workdir)
  which = "ema" if use_ema else "raw"
  if stats.get("step") != step or stats.get("params") != which:
    raise ValueError(
      f"{LATENT_STATS_FILE} was computed for step {stats.get('step')} ({stats.get('params')} params), "
      f"not step {step} ({which}); finish or resume training to refresh it"
    )
  return build_autoencoder(config), params, float(stats["scaling_factor"])
