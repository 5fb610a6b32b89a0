"""Turn a config into the objects a run needs: model, schedule, optimiser, data.

Only this module (and the CLI) reads configs; models and math take explicit keyword arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diffjax.data import ImageDataset, load_dataset, split_holdout
from diffjax.models import UNet
from diffjax.schedules import Schedule, make_schedule
from diffjax.training.state import make_lr_schedule, make_optimizer


def build_model(config: ml_collections.ConfigDict) -> UNet:
  return UNet(**config.model.to_dict())


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
  d = config.diffusion
  return make_schedule(d.schedule, num_timesteps=d.num_timesteps)


def build_optimizer(config: ml_collections.ConfigDict):
  t = config.training
  return make_optimizer(
    learning_rate=t.learning_rate,
    warmup_steps=t.warmup_steps,
    total_steps=t.num_steps,
    decay=t.lr_decay,
    weight_decay=t.weight_decay,
    grad_clip=t.grad_clip,
  )


_LR_KEYS = ("learning_rate", "lr_decay", "warmup_steps", "num_steps")


def _lr_at(config: ml_collections.ConfigDict, step: int) -> float:
  t = config.training
  sched = make_lr_schedule(
    learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.num_steps, decay=t.lr_decay
  )
  return float(sched(step))


def lr_schedule_change(
  previous: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *, step: int
) -> str | None:
  """Says how resuming at ``step`` with ``config`` changes the learning rate ``previous`` had there.

  The schedule is a function of ``training.learning_rate``, ``lr_decay``, ``warmup_steps`` and (cosine)
  ``num_steps``: raising ``num_steps`` to train longer re-stretches a cosine decay, so the rate jumps back
  up at the resume step. Returns ``None`` when the rate at ``step`` is unchanged, else a message naming
  the changed settings and both rates.
  """
  old, new = previous.training, config.training
  changed = [k for k in _LR_KEYS if old.get(k) != new.get(k)]
  if not changed:
    return None
  try:
    before = _lr_at(previous, step)
  except ValueError:  # the old settings cannot build a schedule: nothing to compare with
    return None
  after = _lr_at(config, step)
  if abs(after - before) <= 1e-9 * max(abs(before), abs(after)):
    return None  # e.g. num_steps or warm-up changed under a constant rate already past the warm-up
  settings = ", ".join(f"training.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
  return (
    f"resuming at step {step} with a different learning-rate schedule ({settings}): the rate at this step "
    f"is {after:.3g} instead of the {before:.3g} the run was following"
  )


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return tuple(int(v) for v in config.data.image_shape)


def load_data(config: ml_collections.ConfigDict) -> tuple[ImageDataset, ImageDataset]:
  """Loads the configured source and splits off the held-out set; checks it matches the model."""
  d = config.data
  ds = load_dataset(source=d.source, path=d.path, split=d.split, data_dir=d.data_dir)
  want = image_shape(config)
  if tuple(ds.images.shape[1:]) != want:
    raise ValueError(f"config.data.image_shape={want} but the {ds.name!r} images are {ds.images.shape[1:]}")
  nc = config.model.get("num_classes")
  if nc is not None and ds.num_classes != nc:
    raise ValueError(f"config.model.num_classes={nc} but the {ds.name!r} data has {ds.num_classes} classes")
  return split_holdout(ds, holdout=d.holdout, seed=config.seed)


def init_params(model: UNet, *, key: jax.Array, shape: tuple[int, int, int]):
  """Initialises parameters with a batch of one example (class-conditional models get label 0)."""
  x = jnp.zeros((1, *shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  label = None if model.num_classes is None else jnp.zeros((1,), jnp.int32)
  return model.init({"params": key}, x, t, label, train=False)["params"]
