"""The train state as one pytree, and the optimiser.

``TrainState`` holds everything a resumed run needs except the data position and the PRNG key, both of
which are functions of the step (batch ``k`` is fixed by the seed; per-step keys are
``fold_in(root_key, step)``), so no key ever lives in the (replicated) state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step: int32 scalar; params/ema_params: model pytrees; opt_state: optax state;
  skipped: int32 count of updates rejected as non-finite."""

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  skipped: jnp.ndarray


def make_lr_schedule(
  *, learning_rate: float, warmup_steps: int = 0, total_steps: int | None = None, decay: str = "constant"
) -> optax.Schedule:
  """Step -> learning rate: linear warm-up from 0, then constant or cosine decay to 0.1x at ``total_steps``.

  Raises:
    ValueError: Naming ``learning_rate`` (not > 0), ``total_steps`` (cosine needs it past the warm-up)
      or ``decay`` (not "constant" or "cosine").
  """
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if decay == "constant":
    sched = optax.join_schedules(
      [
        optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
        optax.constant_schedule(learning_rate),
      ],
      [max(warmup_steps, 1)],
    )
  elif decay == "cosine":
    if not total_steps or total_steps <= warmup_steps:
      raise ValueError(f"total_steps must exceed warmup_steps for cosine decay, got {total_steps}")
    sched = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(warmup_steps, 1), total_steps, end_value=0.1 * learning_rate
    )
  else:
    raise ValueError(f"decay={decay!r} is not one of ('constant', 'cosine')")
  return sched


def make_optimizer(
  *,
  learning_rate: float,
  warmup_steps: int = 0,
  total_steps: int | None = None,
  decay: str = "constant",
  weight_decay: float = 0.0,
  grad_clip: float | None = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  """AdamW with linear warm-up, then constant or cosine decay, after global-norm clipping.

  Args:
    learning_rate: peak learning rate (> 0).
    warmup_steps: steps of linear warm-up from 0.
    total_steps: needed for decay="cosine".
    decay: "constant" or "cosine".
    weight_decay: decoupled weight decay of AdamW.
    grad_clip: clip gradients to this global norm (None or 0 disables).
  """
  sched = make_lr_schedule(
    learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay
  )
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def create_train_state(*, params, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 whose EMA starts equal to the parameters."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    skipped=jnp.zeros((), jnp.int32),
  )


def ema_update(ema, params, *, decay: float, step):
  """EMA with the warm-up ``min(decay, (1 + step) / (10 + step))`` so early averages track fast."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def apply_update(state: TrainState, grads, loss, *, tx: optax.GradientTransformation, ema_decay: float):
  """Applies ``grads`` with ``tx`` and the EMA, skipping the update when the loss or gradient norm is not finite.

  The one update of every training step (diffusion, text, ControlNet, DreamBooth, FastComposer). A
  conditional, not a select between new and old values: with the state donated, a select keeps the old
  buffers alive and XLA copies nearly every state leaf (~1000 copies per step for the U-Net on CPU).

  Returns:
      ``(new_state, grad_norm)``.
  """
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    return new_params, ema_update(state.ema_params, new_params, decay=ema_decay, step=state.step), new_opt

  params, ema, opt = jax.lax.cond(
    ok, update, lambda _: (state.params, state.ema_params, state.opt_state), None
  )
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    ema_params=ema,
    opt_state=opt,
    skipped=state.skipped + (~ok).astype(jnp.int32),
  )
  return new_state, grad_norm
