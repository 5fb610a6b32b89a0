"""The jitted training step of text-to-image models (pixel or latent space).

``train_step(state, batch, key) -> (state, metrics)`` as in :mod:`diffjax.training.step`, with the
condition a ``(tokens, mask)`` pair (:mod:`diffjax.text_conditioning`) instead of a label: each caption
is replaced by the empty prompt with probability ``cond_drop_prob`` for classifier-free guidance (Ho &
Salimans 2022). ``batch["x0"]`` is whatever the model diffuses: images in ``[-1, 1]``, or latents
precomputed with :func:`diffjax.latent.encode_images` (latent diffusion, Rombach et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax.losses import diffusion_loss
from diffjax.models.text_encoder import TextTransformer
from diffjax.schedules import Schedule
from diffjax.text_conditioning import drop_condition, make_text_model_fn
from diffjax.training.state import TrainState, apply_update

__all__ = ["make_text_train_step"]


def make_text_train_step(
  *,
  unet: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  null_cond: tuple[Any, Any],
  text_module: TextTransformer | None = None,
  prediction: str = "eps",
  weighting: str = "none",
  min_snr_gamma: float = 5.0,
  cond_drop_prob: float = 0.1,
  ema_decay: float = 0.999,
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)``.

  Args:
      unet: The cross-attention U-Net (:class:`~diffjax.models.UNetCondition`).
      schedule: Diffusion schedule.
      tx: Optimiser.
      null_cond: The empty prompt's ``(tokens, mask)`` with leaves ``[1, L, ...]``.
      text_module: The trainable text encoder when ``batch`` carries token ids (``state.params`` is then
          ``{"unet", "text_encoder"}``); ``None`` when it carries frozen-encoder hidden states.
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      weighting: ``"none"`` or ``"min_snr"``.
      min_snr_gamma: Gamma of the min-SNR weighting.
      cond_drop_prob: Probability of replacing a caption by the empty prompt.
      ema_decay: EMA decay of ``ema_params``.

  The batch is ``{"x0": float32 [B, h, w, c], "tokens": [B, L, ...], "mask": int32 [B, L]}``.

  Raises:
      ValueError: If ``cond_drop_prob`` is not in ``[0, 1)``.
  """
  if not 0.0 <= cond_drop_prob < 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
  null_cond = tuple(jnp.asarray(n) for n in null_cond)

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_drop, k_loss, k_dropout = jax.random.split(key, 3)
    cond = drop_condition(k_drop, (batch["tokens"], batch["mask"]), null_cond=null_cond, p=cond_drop_prob)
    model_fn = make_text_model_fn(unet, text_module=text_module, train=True, dropout_key=k_dropout)

    def loss_fn(params):
      loss, _ = diffusion_loss(
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
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped}

  return train_step
