"""Training and restoring a noise-conditional classifier p(y | x_t, t) for classifier guidance.

``train_classifier(config, workdir)`` trains a :class:`~diffjax.models.classifier.NoisyClassifier` on
images noised at uniformly random timesteps (Dhariwal & Nichol 2021) over the configured data and
held-out split (the same split as a DDPM config with the same data and seed); held-out evaluation:
accuracy at the fixed timesteps ``config.eval.timesteps``. ``load_classifier`` restores the EMA
parameters for guidance (:mod:`diffjax.guidance.classifier`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import diffusion
from diffjax.data import to_model_range
from diffjax.models.classifier import NoisyClassifier
from diffjax.schedules import Schedule, make_schedule
from diffjax.training import builders
from diffjax.training.aux_loop import fit, restore_state
from diffjax.training.classifier_step import make_classifier_train_step
from diffjax.training.state import TrainState, create_train_state
from diffjax.training.workdir import read_config

__all__ = ["classifier_fn", "load_classifier", "train_classifier"]


def _classifier(config) -> NoisyClassifier:
  return NoisyClassifier(**config.model.to_dict())


def _schedule(config) -> Schedule:
  return make_schedule(config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps)


def _classifier_init(classifier, shape, tx):
  def init(key):
    x = jnp.zeros((1, *shape), jnp.float32)
    params = classifier.init(key, x, jnp.zeros((1,), jnp.int32))["params"]
    return create_train_state(params=params, tx=tx)

  return init


def train_classifier(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) a noise-conditional classifier; held-out accuracy at ``config.eval.timesteps``."""
  classifier, schedule = _classifier(config), _schedule(config)
  shape = builders.image_shape(config)
  tx = builders.build_optimizer(config)
  train_ds, heldout_ds = builders.load_data(config)
  init = jax.jit(_classifier_init(classifier, shape, tx))
  step = jax.jit(
    make_classifier_train_step(
      classifier=classifier, schedule=schedule, tx=tx, ema_decay=config.training.ema_decay
    ),
    donate_argnums=(0,),
  )
  n = min(config.eval.num_examples, len(heldout_ds))
  x0 = jnp.asarray(to_model_range(heldout_ds.images[:n]))
  y = jnp.asarray(heldout_ds.labels[:n])
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), 3), x0.shape)

  @jax.jit
  def accuracy(params, t):
    tb = jnp.full((n,), t, jnp.int32)
    x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=tb, noise=noise)
    return jnp.mean(jnp.argmax(classifier.apply({"params": params}, x_t, tb), -1) == y)

  def evaluate(state: TrainState) -> dict:
    return {f"eval_acc_t{t}": float(accuracy(state.ema_params, t)) for t in config.eval.timesteps}

  return fit(
    config=config,
    workdir=workdir,
    init_state=lambda: init(jax.random.fold_in(jax.random.key(config.seed), 0)),
    step_fn=step,
    train_ds=train_ds,
    evaluate=evaluate,
    progress=progress,
  )


def load_classifier(workdir: str) -> tuple[NoisyClassifier, Schedule, Any, ml_collections.ConfigDict]:
  """(classifier, its schedule, EMA parameters, config) of a work directory of :func:`train_classifier`."""
  config = read_config(workdir)
  classifier = _classifier(config)
  tx = builders.build_optimizer(config)
  template = jax.jit(_classifier_init(classifier, builders.image_shape(config), tx))(jax.random.key(0))
  state = restore_state(workdir, template)
  return classifier, _schedule(config), state.ema_params, config


def classifier_fn(classifier: NoisyClassifier):
  """``(params, x_t, t) -> logits`` of a classifier module (the interface of :mod:`diffjax.guidance.classifier`)."""
  return lambda params, x_t, t: classifier.apply({"params": params}, x_t, t)
