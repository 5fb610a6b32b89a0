"""FastComposer's subject-conditioned model and its jitted training step.

The trainable parameters are ``{"unet", "encoder", "fuser"}``: the cross-attention U-Net (initialised
from a trained text-to-image model), the subject image encoder and the fusion MLP
(:mod:`diffjax.models.subject_encoder`). The text encoder is frozen (MiniLM; its contexts come in the
batch), as in FastComposer (Xiao et al. 2023, Sec. 4.1), whose U-Net and image encoder are trained on
captioned images with segmented subjects. Each step:

1. drops, per example, the whole caption (empty prompt, probability ``uncondition_prob``, for
   classifier-free guidance) or only the subjects (text-only context, ``text_only_prob``), as the
   authors' training data does; the text-only rows keep the context that delayed subject conditioning
   starts sampling with in distribution;
2. encodes the reference images and fuses them into the context at the subjects' words;
3. runs the U-Net with its cross-attention probabilities recorded
   (:data:`~diffjax.models.attention_control.ATTENTION_MAPS`) and adds ``localization_weight`` times
   the localization loss (:func:`diffjax.personalization.fastcomposer.localization_loss`) to the
   denoising loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax import diffusion
from diffjax.losses import loss_weight
from diffjax.models.attention_control import ATTENTION_MAPS, cross_attention_maps
from diffjax.models.subject_encoder import SubjectEncoder, SubjectFuser
from diffjax.personalization.fastcomposer import fuse_subjects, localization_loss
from diffjax.schedules import Schedule
from diffjax.training.state import TrainState, apply_update

__all__ = ["layer_filter", "make_fastcomposer_train_step", "subject_context"]


def layer_filter(prefixes: Sequence[str]) -> Callable[[str], bool] | None:
  """A predicate choosing layers whose path starts with one of ``prefixes`` (``None`` for all layers)."""
  prefixes = tuple(str(p) for p in prefixes)
  if not prefixes:
    return None
  return lambda name: name.startswith(prefixes)


def subject_context(
  params: Any,
  *,
  encoder: SubjectEncoder,
  fuser: SubjectFuser,
  context: jnp.ndarray,
  refs: jnp.ndarray,
  positions: jnp.ndarray,
  valid: jnp.ndarray,
) -> jnp.ndarray:
  """The subject-augmented context: encode each reference, fuse it into its word's embedding.

  Args:
      params: ``{"encoder", "fuser", ...}``.
      encoder: The subject encoder.
      fuser: The fusion MLP.
      context: ``[B, L, D]`` text-only context.
      refs: ``[B, N, h, w, C]`` reference images in ``[-1, 1]``.
      positions: ``int [B, N]`` subject word positions.
      valid: ``[B, N]``, nonzero where the subject is given.

  Returns:
      ``[B, L, D]``.

  Raises:
      ValueError: If ``refs`` is not ``[B, N, h, w, C]`` matching ``positions``.
  """
  if refs.ndim != 5 or refs.shape[:2] != positions.shape:
    raise ValueError(f"refs must be [B, N, h, w, C] with [B, N] = {positions.shape}, got {refs.shape}")
  b, n = positions.shape
  emb = encoder.apply({"params": params["encoder"]}, refs.reshape(b * n, *refs.shape[2:]))
  fuse = lambda text, subj: fuser.apply({"params": params["fuser"]}, text, subj)
  return fuse_subjects(
    fuse, context=context, subjects=emb.reshape(b, n, -1), positions=positions, valid=valid
  )


def make_fastcomposer_train_step(
  *,
  unet: nn.Module,
  encoder: SubjectEncoder,
  fuser: SubjectFuser,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  null_cond: tuple[Any, Any],
  localization_weight: float = 0.01,
  localization_layers: Sequence[str] = (),
  prediction: str = "eps",
  weighting: str = "none",
  min_snr_gamma: float = 5.0,
  uncondition_prob: float = 0.1,
  text_only_prob: float = 0.1,
  ema_decay: float = 0.999,
) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)``.

  Args:
      unet: The cross-attention U-Net.
      encoder: The subject encoder.
      fuser: The fusion MLP.
      schedule: Diffusion schedule.
      tx: Optimiser over ``{"unet", "encoder", "fuser"}``.
      null_cond: The empty prompt's ``(context, mask)``, leaves ``[1, L, ...]``.
      localization_weight: Weight of the localization loss (0: only logged, no gradient).
      localization_layers: Path prefixes of the cross-attention layers of the loss (empty: all).
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      weighting: ``"none"`` or ``"min_snr"``.
      min_snr_gamma: Gamma of the min-SNR weighting.
      uncondition_prob: Probability of training on the empty prompt.
      text_only_prob: Probability of training on the text-only context (no subjects).
      ema_decay: EMA decay of ``ema_params``.

  The batch is ``{"x0": [B, h, w, c], "tokens": [B, L, D], "mask": int32 [B, L], "refs": [B, N, r, r, 1],
  "positions": int32 [B, N], "valid": float32 [B, N], "masks": float32 [B, N, H, W]}``.

  Raises:
      ValueError: On a negative weight or probabilities outside ``[0, 1)``.
  """
  if localization_weight < 0:
    raise ValueError(f"localization_weight must be >= 0, got {localization_weight}")
  if not (0 <= uncondition_prob and 0 <= text_only_prob and uncondition_prob + text_only_prob < 1):
    raise ValueError(
      f"uncondition_prob and text_only_prob must be >= 0 with a sum < 1, got {uncondition_prob}, {text_only_prob}"
    )
  null_ctx, null_mask = (jnp.asarray(n) for n in null_cond)
  layers = layer_filter(localization_layers)

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_cond, k_t, k_noise, k_dropout = jax.random.split(key, 4)
    x0 = batch["x0"]
    b = x0.shape[0]
    u = jax.random.uniform(k_cond, (b,))
    uncond = u < uncondition_prob
    text_only = (u >= uncondition_prob) & (u < uncondition_prob + text_only_prob)
    valid = batch["valid"] * (~(uncond | text_only))[:, None].astype(jnp.float32)
    mask = jnp.where(uncond[:, None], jnp.broadcast_to(null_mask, batch["mask"].shape), batch["mask"])
    t = diffusion.sample_timesteps(k_t, batch_size=b, num_timesteps=schedule.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
    target = diffusion.training_target(schedule=schedule, prediction=prediction, x0=x0, t=t, noise=noise)
    w = loss_weight(
      schedule=schedule, t=t, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
    )

    def loss_fn(params):
      ctx = subject_context(
        params,
        encoder=encoder,
        fuser=fuser,
        context=batch["tokens"],
        refs=batch["refs"],
        positions=batch["positions"],
        valid=valid,
      )
      ctx = jnp.where(uncond[:, None, None], jnp.broadcast_to(null_ctx, ctx.shape).astype(ctx.dtype), ctx)
      out, sown = unet.apply(
        {"params": params["unet"]},
        x_t,
        t,
        ctx,
        mask,
        train=True,
        rngs={"dropout": k_dropout},
        mutable=[ATTENTION_MAPS],
      )
      denoise = jnp.mean(w * jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3)))
      loc = localization_loss(
        cross_attention_maps(sown[ATTENTION_MAPS]),
        masks=batch["masks"],
        positions=batch["positions"],
        valid=valid,
        layers=layers,
      )
      if localization_weight == 0:
        return denoise, (denoise, jax.lax.stop_gradient(loc))
      return denoise + localization_weight * loc, (denoise, loc)

    (loss, (denoise, loc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, grad_norm = apply_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
    metrics = {
      "loss": loss,
      "denoise_loss": denoise,
      "localization_loss": loc,
      "grad_norm": grad_norm,
      "skipped": new_state.skipped,
    }
    return new_state, metrics

  return train_step
