"""The training step of a ControlNet beside a frozen U-Net (Zhang et al. 2023, Sec. 3.3).

The denoising loss of the controlled model (:func:`diffjax.control.make_controlled_model_fn`) with the
base U-Net frozen: only the ControlNet's parameters are differentiated, held in the optimiser and
averaged; the conditioning image is computed from the clean batch inside the step, and the base's
condition (class label) is replaced by the null one with probability ``cond_drop_prob`` (the paper drops
50% of the prompts so the ControlNet learns to read the content from the conditioning image). ``(state, base_params, batch, key) -> (state,
metrics)`` with ``fold_in(key, state.step)`` inside; non-finite updates are skipped as in
:mod:`diffjax.training.step`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax.control import control_cond, make_controlled_model_fn
from diffjax.guidance import drop_labels
from diffjax.losses import diffusion_loss
from diffjax.schedules import Schedule
from diffjax.training.state import TrainState, apply_update

__all__ = ["make_controlnet_train_step"]


def make_controlnet_train_step(
  *,
  unet: nn.Module,
  controlnet: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  control_fn: Callable[[jnp.ndarray], jnp.ndarray],
  prediction: str = "eps",
  cond_drop_prob: float = 0.5,
  ema_decay: float = 0.999,
) -> Callable:
  """Builds ``train_step(state, base_params, batch, key) -> (state, metrics)`` for a ControlNet.

  Args:
      unet: The frozen base (:class:`~diffjax.models.UNet`; labels are used when it is class-conditional).
      controlnet: Its :class:`~diffjax.models.unet_controlnet.UNetControlNet`.
      schedule: The base's diffusion schedule.
      tx: Optimiser of the ControlNet's parameters (``state.params``).
      control_fn: Clean images ``[B, H, W, C]`` in ``[-1, 1]`` -> conditioning images (jnp, traced).
      prediction: The base's parameterisation.
      cond_drop_prob: Probability of replacing a label by the null class.
      ema_decay: EMA decay of the ControlNet's parameters.

  The batch is ``{"image": [B, H, W, C] in [-1, 1], "label": [B] int32}``; ``base_params`` is never
  updated.
  """
  if not 0.0 <= cond_drop_prob <= 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
  conditional = getattr(unet, "num_classes", None) is not None

  def train_step(state: TrainState, base_params, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_drop, k_loss, k_dropout = jax.random.split(key, 3)
    labels = None
    if conditional:
      labels = drop_labels(k_drop, batch["label"], null_label=unet.num_classes, p=cond_drop_prob)
    cond = control_cond(labels, jax.lax.stop_gradient(control_fn(batch["image"])))
    controlled = make_controlled_model_fn(unet, controlnet, train=True, dropout_key=k_dropout)
    base_params = jax.lax.stop_gradient(base_params)

    def loss_fn(cn_params):
      model_fn = lambda p, x, t, c: controlled({"base": base_params, "controlnet": p}, x, t, c)
      loss, _ = diffusion_loss(
        model_fn=model_fn,
        params=cn_params,
        schedule=schedule,
        x0=batch["image"],
        cond=cond,
        key=k_loss,
        prediction=prediction,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    return state, {"loss": loss, "grad_norm": grad_norm, "skipped": state.skipped}

  return train_step
