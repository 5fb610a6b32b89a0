"""DreamBooth: fine-tune a text-to-image U-Net on a few images of one subject, with prior preservation.

DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", Sec. 3.2-3.3) binds a subject to a rare identifier ``[V]`` by fine-tuning
the denoiser on 3-5 images captioned "a [V] [class noun]". Fine-tuning on so few images makes the model
forget what the class looks like in general (*language drift*: "a [class noun]" starts to produce the
subject) and lose diversity. Its remedy is the class-specific prior-preservation loss: the frozen base
model generates images of the class from "a [class noun]" once, and fine-tuning keeps denoising them,

    L = E ||x_hat(x_t, c_subject) - x||^2 + lambda E ||x_hat(x'_t, c_class) - x'||^2,

with ``lambda = 1`` and about 100-200 class images in the paper (Eq. 2). Here both terms are the
library's denoising loss (any prediction type and weighting); :func:`prior_preservation_loss` takes the
per-example losses of one batch holding instance and class rows, so the batch is sharded along ``data``
like every other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax.losses import diffusion_loss
from diffjax.schedules import Schedule
from diffjax.text_conditioning import drop_condition, make_text_model_fn
from diffjax.training.state import TrainState, apply_update

__all__ = ["make_dreambooth_train_step", "prior_preservation_loss"]


def prior_preservation_loss(
  per_example: jnp.ndarray, *, is_prior: jnp.ndarray, prior_weight: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """DreamBooth's loss: mean over subject rows plus ``prior_weight`` times mean over class rows.

  Args:
      per_example: ``[B]`` per-example denoising losses.
      is_prior: ``[B]``, nonzero for class (prior) rows, 0 for subject (instance) rows.
      prior_weight: ``lambda`` (0 disables prior preservation).

  Returns:
      ``(loss, instance_loss, prior_loss)`` scalars (a mean over no rows is 0).
  """
  prior = (is_prior != 0).astype(jnp.float32)
  inst = 1.0 - prior
  instance_loss = jnp.sum(per_example * inst) / jnp.maximum(jnp.sum(inst), 1.0)
  prior_loss = jnp.sum(per_example * prior) / jnp.maximum(jnp.sum(prior), 1.0)
  return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss


def make_dreambooth_train_step(
  *,
  unet: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  null_cond: tuple[Any, Any],
  prior_weight: float = 1.0,
  prediction: str = "eps",
  weighting: str = "none",
  min_snr_gamma: float = 5.0,
  cond_drop_prob: float = 0.0,
  ema_decay: float = 0.0,
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)`` fine-tuning the U-Net.

  Args:
      unet: The cross-attention U-Net (frozen text encoder: ``batch["tokens"]`` are its contexts).
      schedule: The base model's schedule.
      tx: Optimiser.
      null_cond: The empty prompt's ``(context, mask)``, leaves ``[1, L, ...]``.
      prior_weight: ``lambda`` of :func:`prior_preservation_loss`.
      prediction: The base model's parameterisation.
      weighting: ``"none"`` or ``"min_snr"``.
      min_snr_gamma: Gamma of the min-SNR weighting.
      cond_drop_prob: Probability of replacing a caption by the empty prompt (0 in DreamBooth).
      ema_decay: EMA decay of ``ema_params`` (0: the EMA equals the parameters).

  The batch is ``{"x0": [B, h, w, c], "tokens": [B, L, D], "mask": int32 [B, L], "prior": int32 [B]}``.

  Raises:
      ValueError: If ``prior_weight < 0`` or ``cond_drop_prob`` is not in ``[0, 1)``.
  """
  if prior_weight < 0:
    raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
  if not 0.0 <= cond_drop_prob < 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
  null_cond = tuple(jnp.asarray(n) for n in null_cond)

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_drop, k_loss, k_dropout = jax.random.split(key, 3)
    cond = (batch["tokens"], batch["mask"])
    if cond_drop_prob > 0:
      cond = drop_condition(k_drop, cond, null_cond=null_cond, p=cond_drop_prob)
    model_fn = make_text_model_fn(unet, train=True, dropout_key=k_dropout)

    def loss_fn(params):
      _, per_example = diffusion_loss(
        model_fn=model_fn,
        params=params,
        schedule=schedule,
        x0=batch["x0"],
        cond=cond,
        key=k_loss,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
      )
      loss, inst, prior = prior_preservation_loss(
        per_example, is_prior=batch["prior"], prior_weight=prior_weight
      )
      return loss, (inst, prior)

    (loss, (inst, prior)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    metrics = {
      "loss": loss,
      "instance_loss": inst,
      "prior_loss": prior,
      "grad_norm": grad_norm,
      "skipped": new_state.skipped,
    }
    return new_state, metrics

  return train_step
