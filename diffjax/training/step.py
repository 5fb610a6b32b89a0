"""The jitted training step and its data-parallel compilation.

The step is a pure function ``(state, batch, key) -> (state, metrics)``; the per-step key is
``fold_in(key, state.step)`` inside it, so the same root key is passed every step. Updates whose
loss or gradient norm is not finite are skipped (parameters, EMA and optimiser state unchanged) and
counted in ``state.skipped``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from diffjax import parallel
from diffjax.guidance import drop_labels
from diffjax.losses import diffusion_loss
from diffjax.schedules import Schedule
from diffjax.training.state import TrainState, apply_update


def make_model_fn(model: nn.Module, *, train: bool = False, dropout_key: jax.Array | None = None):
  """Wraps a U-Net-like module as ``model_fn(params, x_t, t, cond)``; ``cond`` is the label or None."""
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None

  def model_fn(params, x_t, t, cond):
    return model.apply({"params": params}, x_t, t, cond, train=train, rngs=rngs)

  return model_fn


def make_train_step(
  *,
  model: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  prediction: str = "eps",
  weighting: str = "none",
  min_snr_gamma: float = 5.0,
  cond_drop_prob: float = 0.1,
  ema_decay: float = 0.999,
  class_conditional: bool = True,
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)``.

  Args:
    model: the denoiser module, called as ``model.apply(v, x_t, t, label, train=...)``.
    schedule: diffusion schedule.
    tx: optimiser.
    prediction: "eps", "x0" or "v".
    weighting: loss weighting ("none" or "min_snr").
    cond_drop_prob: probability of replacing a label by the null class (classifier-free guidance).
    ema_decay: EMA decay of ``ema_params``.
    class_conditional: whether ``batch["label"]`` is fed to the model.

  The batch is ``{"image": [B, H, W, C] float32 in [-1, 1], "label": [B] int32}``.
  """
  if not 0.0 <= cond_drop_prob < 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_drop, k_loss, k_dropout = jax.random.split(key, 3)
    cond = None
    if class_conditional:
      cond = drop_labels(k_drop, batch["label"], null_label=model.num_classes, p=cond_drop_prob)
    model_fn = make_model_fn(model, train=True, dropout_key=k_dropout)

    def loss_fn(params):
      loss, _ = diffusion_loss(
        model_fn=model_fn,
        params=params,
        schedule=schedule,
        x0=batch["image"],
        cond=cond,
        key=k_loss,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped}
    return new_state, metrics

  return train_step


def compile_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """jit with the state replicated, the batch sharded along ``data`` and the state donated."""
  rep, dat = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(rep, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,))
