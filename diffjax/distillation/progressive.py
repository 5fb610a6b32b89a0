"""Progressive distillation (Salimans & Ho 2022): a student does in one DDIM step what its teacher does in 2.

The student samples with N deterministic DDIM steps on the trailing grid t_i = round((i + 1) T / N) - 1,
i = 0..N-1 (from t = T - 1 down to the clean end t = -1, the grid of
:func:`~diffjax.samplers.timesteps.make_timesteps` with ``spacing="trailing"``). The teacher samples with
2N steps on the refined grid, which contains the student's grid and the midpoints between its steps. For
a student step t -> t'' the teacher takes two DDIM (eta = 0) steps t -> t' -> t'' from the same z_t, and
the student regresses the x whose single DDIM step lands exactly on the teacher's z_t'' (Algorithm 2):

  x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

with alpha = sqrt(alpha-bar) and sigma = sqrt(1 - alpha-bar); at the clean end (alpha = 1, sigma = 0) this
is the teacher's z_{-1} itself. The loss is the x-space error weighted by max(SNR_t, 1) ("truncated SNR",
Sec. 4), whatever the student's parameterisation ("v" or "x0"; "eps" is accepted but cannot express the
one-step limit). The teacher is any ``model_fn(params, z_t, t, cond)``: the trained model for the first
halving, the previous halving's student afterwards (or a guided student, see :mod:`.guided`).

References:
  Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR,
    arXiv:2202.00512, Algorithm 2 and Sec. 4 (v-parameterisation, truncated-SNR weighting).
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (the eta = 0 update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax import diffusion
from diffjax.losses import ModelFn
from diffjax.samplers import ddim as samplers_ddim
from diffjax.samplers.loop import alpha_bar_at
from diffjax.schedules import Schedule
from diffjax.training.state import TrainState, ema_update

DISTILL_WEIGHTINGS = ("truncated_snr", "snr", "constant")


def student_grid(*, num_timesteps: int, num_steps: int) -> np.ndarray:
  """The increasing trailing grid ``[num_steps]`` (int32) of an N-step sampler, ending at ``T - 1``.

  It equals the first N entries of ``make_timesteps(..., spacing="trailing")``, so an N-step student
  samples with ``ddim_sample(..., num_steps=N, spacing="trailing", eta=0)``.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule's T), got {num_steps}")
  i = np.arange(1, num_steps + 1, dtype=np.float64)
  return (np.round(i * num_timesteps / num_steps) - 1).astype(np.int32)


def step_triplets(*, num_timesteps: int, num_student_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """For each student step i: (t, t_mid, t_next), each int32 ``[N]``; ``t_next = -1`` is the clean end.

  The student steps t_i -> t_{i-1}; the teacher steps t_i -> t_mid -> t_{i-1} on the 2N-step trailing grid.
  Needs 2N <= T, so that the teacher's grid has distinct timesteps.
  """
  n = int(num_student_steps)
  if not 1 <= 2 * n <= num_timesteps:
    raise ValueError(f"2 * num_student_steps must be in [2, T={num_timesteps}], got {2 * n}")
  fine = student_grid(num_timesteps=num_timesteps, num_steps=2 * n)
  t = fine[1::2]
  t_mid = fine[0::2]
  t_next = np.concatenate([[-1], t[:-1]]).astype(np.int32)
  return t, t_mid, t_next


def _alpha_bar(schedule: Schedule, t, ndim: int):
  """alpha-bar at int ``t`` ``[B]`` (t = -1 is clean: 1), shaped ``[B, 1, ..]``."""
  ab = alpha_bar_at(schedule.alphas_cumprod, jnp.asarray(t))
  return ab.reshape(ab.shape + (1,) * (ndim - ab.ndim))


def _alpha_sigma(schedule: Schedule, t, ndim: int):
  """alpha and sigma at int ``t`` ``[B]`` (t = -1 is clean: alpha 1, sigma 0), shaped ``[B, 1, ..]``."""
  ab = _alpha_bar(schedule, t, ndim)
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def ddim_update(*, schedule: Schedule, x0, eps, t_next):
  """Deterministic DDIM step to ``t_next`` ``[B]`` from estimates (x0, eps): alpha'' x0 + sigma'' eps.

  :func:`diffjax.samplers.ddim.ddim_update` with ``sigma = 0`` at per-example timesteps.
  """
  return samplers_ddim.ddim_update(x0=x0, eps=eps, ab_prev=_alpha_bar(schedule, t_next, x0.ndim), sigma=0.0)


def teacher_two_steps(
  *,
  teacher_fn: ModelFn,
  teacher_params,
  schedule: Schedule,
  z_t: jnp.ndarray,
  t: jnp.ndarray,
  t_mid: jnp.ndarray,
  t_next: jnp.ndarray,
  cond: Any,
  prediction: str = "v",
  clip_x0: float | None = None,
) -> jnp.ndarray:
  """Two DDIM (eta = 0) steps of the teacher, z_t -> z_t' -> z_t'' (per-example timesteps).

  Args:
    teacher_fn: ``(params, z, t, cond) -> prediction``.
    teacher_params: its parameters.
    schedule: the discrete schedule.
    z_t: ``[B, H, W, C]`` noisy inputs at ``t``.
    t, t_mid, t_next: int ``[B]`` with t > t_mid > t_next >= -1.
    cond: passed to ``teacher_fn`` (labels, or a pytree such as ``{"label", "w"}``).
    prediction: the teacher's parameterisation.
    clip_x0: clip the teacher's x estimates (Salimans & Ho do not clip while distilling: None).

  Returns:
    z_t'' ``[B, H, W, C]``; at ``t_next = -1`` the teacher's clean estimate from z_t'.
  """

  def step(z, t_from, t_to):
    out = teacher_fn(teacher_params, z, t_from, cond).astype(z.dtype)
    x0, eps = diffusion.to_x0_eps(
      schedule=schedule, prediction=prediction, x_t=z, t=t_from, output=out, clip_x0=clip_x0
    )
    return ddim_update(schedule=schedule, x0=x0, eps=eps, t_next=t_to)

  return step(step(z_t, t, t_mid), t_mid, t_next)


def one_step_target(*, schedule: Schedule, z_t, t, t_next, z_next) -> jnp.ndarray:
  """The x whose DDIM step from (z_t, t) lands on ``z_next`` at ``t_next`` (Salimans & Ho, Algorithm 2).

  x~ = (z'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha); at ``t_next = -1`` it is z''.

  Args:
    z_t: ``[B, ...]`` at int ``t`` ``[B]``; z_next: ``[B, ...]`` at int ``t_next`` ``[B]`` (t_next < t).
  """
  a, s = _alpha_sigma(schedule, t, z_t.ndim)
  a2, s2 = _alpha_sigma(schedule, t_next, z_t.ndim)
  r = s2 / s
  return (z_next - r * z_t) / (a2 - r * a)


def x_space_weight(*, schedule: Schedule, t, weighting: str = "truncated_snr") -> jnp.ndarray:
  """Per-example weight ``[B]`` of the x-space squared error: max(SNR, 1), SNR or 1."""
  if weighting not in DISTILL_WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not one of {DISTILL_WEIGHTINGS}")
  snr = schedule.snr[t]
  if weighting == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr":
    return snr
  return jnp.ones_like(snr)


def x_space_loss(
  *, schedule: Schedule, student_out, prediction: str, z_t, t, x_target, weighting: str = "truncated_snr"
):
  """Weighted x-space regression of a student output of any parameterisation; (loss, per_example ``[B]``)."""
  x_hat, _ = diffusion.to_x0_eps(
    schedule=schedule, prediction=prediction, x_t=z_t, t=t, output=student_out.astype(jnp.float32)
  )
  mse = jnp.mean(jnp.square(x_hat - x_target), axis=tuple(range(1, x_hat.ndim)))
  per_example = x_space_weight(schedule=schedule, t=t, weighting=weighting) * mse
  return jnp.mean(per_example), per_example


def progressive_distillation_loss(
  *,
  student_fn: ModelFn,
  student_params,
  teacher_fn: ModelFn,
  teacher_params,
  schedule: Schedule,
  x0: jnp.ndarray,
  cond: Any,
  key: jax.Array,
  num_student_steps: int,
  student_prediction: str = "v",
  teacher_prediction: str = "v",
  weighting: str = "truncated_snr",
):
  """The distillation loss of one batch (Salimans & Ho 2022, Algorithm 2).

  Args:
    student_fn, teacher_fn: ``(params, z, t, cond) -> prediction``.
    student_params, teacher_params: their parameters (no gradient flows into the teacher).
    schedule: the discrete schedule of the teacher.
    x0: data ``[B, H, W, C]`` in [-1, 1].
    cond: passed to both models.
    key: PRNG key for the student step index and the noise.
    num_student_steps: N (static); the teacher runs on the 2N-step grid.
    student_prediction, teacher_prediction: parameterisations ("v", "x0" or "eps").
    weighting: x-space weight, "truncated_snr" (max(SNR, 1), the paper's), "snr" or "constant".

  Returns:
    (loss, per_example_loss ``[B]``).
  """
  ts, mids, nexts = (
    jnp.asarray(a)
    for a in step_triplets(num_timesteps=schedule.num_timesteps, num_student_steps=num_student_steps)
  )
  k_i, k_n = jax.random.split(key)
  i = jax.random.randint(k_i, (x0.shape[0],), 0, num_student_steps)
  t, t_mid, t_next = ts[i], mids[i], nexts[i]
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  z_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
  z_next = teacher_two_steps(
    teacher_fn=teacher_fn,
    teacher_params=teacher_params,
    schedule=schedule,
    z_t=z_t,
    t=t,
    t_mid=t_mid,
    t_next=t_next,
    cond=cond,
    prediction=teacher_prediction,
  )
  x_target = jax.lax.stop_gradient(
    one_step_target(schedule=schedule, z_t=z_t, t=t, t_next=t_next, z_next=z_next)
  )
  out = student_fn(student_params, z_t, t, cond)
  return x_space_loss(
    schedule=schedule,
    student_out=out,
    prediction=student_prediction,
    z_t=z_t,
    t=t,
    x_target=x_target,
    weighting=weighting,
  )


def apply_gradients(
  state: TrainState, *, loss, grads, tx: optax.GradientTransformation, ema_decay: float
) -> tuple[TrainState, dict]:
  """One optimiser update with EMA; a non-finite loss or gradient leaves the state as it was (counted).

  The skip is a ``lax.cond``, not a select of new and old values, which under donation would make XLA
  copy every state leaf (as in :func:`diffjax.training.step.make_train_step`).
  """
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    return (
      new_params,
      ema_update(state.ema_params, new_params, decay=ema_decay, step=state.step),
      new_opt_state,
    )

  params, ema, opt_state = jax.lax.cond(
    ok, update, lambda _: (state.params, state.ema_params, state.opt_state), None
  )
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    ema_params=ema,
    opt_state=opt_state,
    skipped=state.skipped + (~ok).astype(jnp.int32),
  )
  return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped}


CondFn = Callable[[dict, jax.Array], Any]


def make_progressive_step(
  *,
  student_fn: Callable[[jax.Array], ModelFn],
  teacher_fn: ModelFn,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  num_student_steps: int,
  cond_fn: CondFn,
  student_prediction: str = "v",
  teacher_prediction: str = "v",
  weighting: str = "truncated_snr",
  ema_decay: float = 0.0,
) -> Callable:
  """Builds ``step(state, batch, key, teacher_params) -> (state, metrics)`` for one halving.

  Args:
    student_fn: ``dropout_key -> model_fn`` of the student in training mode.
    teacher_fn: the teacher's ``model_fn`` (inference mode).
    schedule: the discrete schedule.
    tx: the student's optimiser.
    num_student_steps: N of this halving.
    cond_fn: ``(batch, key) -> cond`` (e.g. the labels, or labels with sampled guidance weights).
    student_prediction, teacher_prediction, weighting: see :func:`progressive_distillation_loss`.
    ema_decay: EMA of the student (Salimans & Ho use none: 0, so ``ema_params == params``).

  The per-step key is ``fold_in(key, state.step)``, so a resumed stage draws the same noise.
  """

  def step(state: TrainState, batch: dict, key: jax.Array, teacher_params):
    key = jax.random.fold_in(key, state.step)
    k_cond, k_loss, k_dropout = jax.random.split(key, 3)
    cond = cond_fn(batch, k_cond)
    model_fn = student_fn(k_dropout)

    def loss_fn(params):
      loss, _ = progressive_distillation_loss(
        student_fn=model_fn,
        student_params=params,
        teacher_fn=teacher_fn,
        teacher_params=teacher_params,
        schedule=schedule,
        x0=batch["image"],
        cond=cond,
        key=k_loss,
        num_student_steps=num_student_steps,
        student_prediction=student_prediction,
        teacher_prediction=teacher_prediction,
        weighting=weighting,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, loss=loss, grads=grads, tx=tx, ema_decay=ema_decay)

  return step
