"""Training and restoring a ControlNet on a trained pixel U-Net.

``train_controlnet(config, workdir)`` restores the base model of ``config.base.workdir`` (a work
directory of ``python -m diffjax train``; EMA parameters, frozen), builds a
:class:`~diffjax.models.unet_controlnet.UNetControlNet` initialised from it (Zhang et al. 2023) and
trains it on the base's own training split with the conditioning image computed from each batch
(:mod:`diffjax.data.control_signals`). Held-out evaluation: the denoising loss of the controlled and of
the plain base model on the same images, timesteps and noise (control should lower it).

``load_controlnet`` rebuilds what an experiment needs from the work directory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import diffusion
from diffjax.control import control_cond, make_controlled_model_fn
from diffjax.data import ImageDataset, to_model_range
from diffjax.data.control_signals import control_channels, control_signal
from diffjax.models.controlnet import controlnet_params_from_unet
from diffjax.models.unet_controlnet import UNetControlNet
from diffjax.schedules import Schedule
from diffjax.training import builders
from diffjax.training.aux_loop import fit, restore_state
from diffjax.training.controlnet_step import make_controlnet_train_step
from diffjax.training.restore import load_trained
from diffjax.training.state import TrainState, create_train_state
from diffjax.training.step import make_model_fn
from diffjax.training.workdir import read_config

__all__ = ["ControlNetRun", "load_base", "load_controlnet", "make_control_fn", "train_controlnet"]


@dataclasses.dataclass
class ControlNetRun:
  """A restored controlled model: base U-Net, ControlNet, schedule, ``params = {"base", "controlnet"}``."""

  config: Any
  base_config: Any
  unet: Any
  controlnet: UNetControlNet
  schedule: Schedule
  params: dict
  image_shape: tuple[int, int, int]
  heldout: ImageDataset

  def control_fn(self, images: jnp.ndarray) -> jnp.ndarray:
    """Conditioning images of ``[B, H, W, C]`` images in ``[-1, 1]`` (the training signal)."""
    return make_control_fn(self.config.control)(images)


def make_control_fn(control: ml_collections.ConfigDict):
  """The configured signal as a function of images in ``[-1, 1]`` (``config.control``)."""
  kind = control.kind
  if kind == "edges":
    return functools.partial(control_signal, "edges", threshold=control.threshold, thin=control.thin)
  if kind == "low_res":
    return functools.partial(control_signal, "low_res", factor=control.factor)
  return functools.partial(control_signal, kind)


def load_base(config: ml_collections.ConfigDict):
  """(base config, U-Net, schedule, EMA params, train split, held-out split) of ``config.base``."""
  base_config = read_config(config.base.workdir)
  if config.base.data_path:
    base_config.data.path = config.base.data_path
  unet, schedule, params = load_trained(base_config, config.base.workdir)
  train_ds, heldout_ds = builders.load_data(base_config)
  return base_config, unet, schedule, params, train_ds, heldout_ds


def _controlnet(config, unet) -> UNetControlNet:
  return UNetControlNet.from_unet(
    unet,
    conditioning_channels=control_channels(config.control.kind) * unet.in_channels,
    conditioning_embedding_out_channels=tuple(config.control.embedding_channels),
  )


def _controlnet_template(controlnet, unet_params, shape, tx=None):
  x = jnp.zeros((1, *shape), jnp.float32)
  f = controlnet.conditioning_factor
  img = jnp.zeros((1, shape[0] * f, shape[1] * f, controlnet.conditioning_channels), jnp.float32)
  label = None if controlnet.num_classes is None else jnp.zeros((1,), jnp.int32)

  def init(key, unet_params):
    fresh = controlnet.init(key, x, jnp.zeros((1,), jnp.int32), label, img)["params"]
    params = controlnet_params_from_unet(fresh, unet_params)
    return params if tx is None else create_train_state(params=params, tx=tx)

  return init


def train_controlnet(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) a ControlNet on the frozen base of ``config.base.workdir``; returns the last metrics."""
  base_config, unet, schedule, base_params, train_ds, heldout_ds = load_base(config)
  shape = builders.image_shape(base_config)
  controlnet = _controlnet(config, unet)
  tx = builders.build_optimizer(config)
  control_fn = make_control_fn(config.control)
  init = jax.jit(_controlnet_template(controlnet, base_params, shape, tx))
  step = jax.jit(
    make_controlnet_train_step(
      unet=unet,
      controlnet=controlnet,
      schedule=schedule,
      tx=tx,
      control_fn=control_fn,
      prediction=base_config.diffusion.prediction,
      cond_drop_prob=config.training.cond_drop_prob,
      ema_decay=config.training.ema_decay,
    ),
    donate_argnums=(0,),
  )

  n = min(config.eval.num_examples, len(heldout_ds))
  x0 = jnp.asarray(to_model_range(heldout_ds.images[:n]))
  labels = None if unet.num_classes is None else jnp.full((n,), unet.num_classes, jnp.int32)
  k_t, k_n = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 3))
  t = jax.random.randint(k_t, (n,), 0, schedule.num_timesteps)
  noise = jax.random.normal(k_n, x0.shape)
  x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
  target = diffusion.eps_from_x0(schedule=schedule, x_t=x_t, t=t, x0=x0)
  controlled = make_controlled_model_fn(unet, controlnet)
  plain = make_model_fn(unet)

  @jax.jit
  def eval_losses(cn_params, base_params):
    cond = control_cond(labels, control_fn(x0))
    out_c = controlled({"base": base_params, "controlnet": cn_params}, x_t, t, cond)
    out_b = plain(base_params, x_t, t, labels)
    eps_c = diffusion.to_x0_eps(
      schedule=schedule, prediction=base_config.diffusion.prediction, x_t=x_t, t=t, output=out_c
    )[1]
    eps_b = diffusion.to_x0_eps(
      schedule=schedule, prediction=base_config.diffusion.prediction, x_t=x_t, t=t, output=out_b
    )[1]
    return jnp.mean((eps_c - target) ** 2), jnp.mean((eps_b - target) ** 2)

  def evaluate(state: TrainState) -> dict:
    c, b = jax.device_get(eval_losses(state.ema_params, base_params))
    return {"eval_eps_mse_controlled": float(c), "eval_eps_mse_base": float(b)}

  return fit(
    config=config,
    workdir=workdir,
    init_state=lambda: init(jax.random.fold_in(jax.random.key(config.seed), 0), base_params),
    step_fn=lambda s, batch, key: step(s, base_params, batch, key),
    train_ds=train_ds,
    evaluate=evaluate,
    progress=progress,
  )


def load_controlnet(
  workdir: str, *, base_workdir: str | None = None, data_path: str | None = None
) -> ControlNetRun:
  """Restores a trained ControlNet (EMA parameters) and its frozen base.

  Args:
      workdir: The ControlNet's work directory.
      base_workdir: Overrides the base work directory recorded in its config.
      data_path: Overrides the data path of the base's config.
  """
  config = read_config(workdir)
  if base_workdir:
    config.base.workdir = base_workdir
  if data_path:
    config.base.data_path = data_path
  base_config, unet, schedule, base_params, _, heldout_ds = load_base(config)
  shape = builders.image_shape(base_config)
  controlnet = _controlnet(config, unet)
  tx = builders.build_optimizer(config)
  template = jax.jit(_controlnet_template(controlnet, base_params, shape, tx))(jax.random.key(0), base_params)
  state = restore_state(workdir, template)
  return ControlNetRun(
    config,
    base_config,
    unet,
    controlnet,
    schedule,
    {"base": base_params, "controlnet": state.ema_params},
    shape,
    heldout_ds,
  )
