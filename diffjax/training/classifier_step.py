"""The training step of a noise-conditional classifier p(y | x_t, t) (Dhariwal & Nichol 2021).

Cross-entropy of the classifier on images noised by ``q(x_t | x_0)`` at a uniformly random t, so that
its gradient is meaningful at every noise level of sampling (:mod:`diffjax.guidance.classifier`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax import diffusion
from diffjax.schedules import Schedule
from diffjax.training.state import apply_update
from diffjax.training.state import TrainState

__all__ = ["make_classifier_train_step"]


def make_classifier_train_step(
  *, classifier: nn.Module, schedule: Schedule, tx: optax.GradientTransformation, ema_decay: float = 0.999
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)`` for a noise-conditional classifier.

  Each image is noised to ``x_t ~ q(x_t | x_0)`` at its own ``t ~ U{0, ..., T-1}``; the loss is the
  cross-entropy of ``classifier(x_t, t)`` against ``batch["label"]``.
  """

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_t, k_noise, k_dropout = jax.random.split(key, 3)
    x0, labels = batch["image"], batch["label"]
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_timesteps)
    x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=jax.random.normal(k_noise, x0.shape))

    def loss_fn(params):
      logits = classifier.apply({"params": params}, x_t, t, train=True, rngs={"dropout": k_dropout})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    return state, {"loss": loss, "accuracy": acc, "grad_norm": grad_norm, "skipped": state.skipped}

  return train_step
