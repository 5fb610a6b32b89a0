"""SDEdit: edit an image by noising it to an intermediate time and denoising it (Meng et al. 2022).

"SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations" (ICLR 2022): a guide
(a stroke painting, a coarse or corrupted image) is perturbed with the forward process to time
``t0 = strength * T`` and the reverse process is run from there. Small ``strength`` stays faithful to the
guide; large ``strength`` is realistic but forgets it (the paper's Fig. 3 trade-off). With a mask, the
region outside the mask is replaced at every step by the guide noised to the current time (the paper's
Algorithm 3), so it equals the guide exactly at the end.

The reverse process is any of diffjax's step functions run by :func:`diffjax.samplers.reverse_loop` over the
lowest ``k = ceil(strength * num_steps)`` entries of the sampler's timestep table (as diffusers'
img2img pipelines do), so ``strength`` may be a traced value: a new strength does not recompile.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import diffusion
from diffjax.losses import ModelFn
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.ddpm import ddpm_step
from diffjax.samplers.loop import reverse_loop
from diffjax.samplers.timesteps import TimestepTable, check_num_steps, make_timesteps
from diffjax.schedules import Schedule

__all__ = [
  "SDEDIT_SAMPLERS",
  "check_strength",
  "sdedit",
  "sdedit_full_steps",
  "sdedit_num_steps",
  "sdedit_setup",
  "sdedit_step",
]

SDEDIT_SAMPLERS = ("ddim", "ddpm")


def check_strength(strength) -> None:
  """Raises a clear error for a concrete ``strength`` outside (0, 1]; traced values pass through."""
  if isinstance(strength, jax.core.Tracer):
    return
  s = np.asarray(strength)  # not jnp: under jit that would stage a tracer even for a Python float
  if s.ndim != 0:
    raise ValueError(f"strength must be a scalar, got shape {tuple(s.shape)}")
  if not 0.0 < float(s) <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {float(s)}")


def sdedit_num_steps(*, strength, num_steps):
  """Steps actually run, ``clip(ceil(strength * num_steps), 1, num_steps)`` (traceable)."""
  n = jnp.asarray(num_steps, jnp.int32)
  k = jnp.ceil(jnp.asarray(strength, jnp.float32) * n.astype(jnp.float32) - 1e-4).astype(jnp.int32)
  return jnp.clip(k, 1, n)


def sdedit_full_steps(*, sampler: str, num_steps, num_timesteps: int):
  """Steps of a full (strength 1) run: all ``num_timesteps`` for "ddpm", ``num_steps`` for "ddim"."""
  return num_timesteps if sampler == "ddpm" else num_steps


def sdedit_setup(
  *,
  schedule: Schedule,
  x_guide: jnp.ndarray,
  key: jax.Array,
  strength,
  mask: jnp.ndarray | None = None,
  sampler: str = "ddim",
  num_steps=50,
  spacing: str = "trailing",
  table: TimestepTable | None = None,
):
  """Checks SDEdit's inputs and noises the guide: the start of :func:`sdedit`'s reverse loop.

  Returns:
    ``(x_t0, timesteps, k, mask, prev_timesteps, final_alpha_bar)``: the guide noised to
    ``t0 = timesteps[k - 1]`` with ``fold_in(key, 0)``, the sampler's timestep table, the number of steps
    run, the mask as an array of ``x_guide``'s dtype (or None), and the explicit step targets and final
    alpha-bar of ``table`` (None and 1.0 without one).

  Raises:
    ValueError: as :func:`sdedit`.
  """
  if sampler not in SDEDIT_SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {SDEDIT_SAMPLERS}")
  check_strength(strength)
  if x_guide.ndim != 4:
    raise ValueError(f"x_guide must be [B, H, W, C], got shape {tuple(x_guide.shape)}")
  if mask is not None:
    mask = jnp.asarray(mask, x_guide.dtype)
    if mask.ndim != 4 or mask.shape[:3] != x_guide.shape[:3] or mask.shape[3] not in (1, x_guide.shape[3]):
      raise ValueError(
        f"mask must have shape [B, H, W, 1] or {list(x_guide.shape)} to match x_guide, got {list(mask.shape)}"
      )
  T = schedule.num_timesteps
  B = x_guide.shape[0]
  prev_ts, final_ab = None, 1.0
  if sampler == "ddpm":
    if table is not None:
      raise ValueError("table applies to sampler='ddim' only")
    ts = jnp.arange(T, dtype=jnp.int32)
  elif table is None:
    check_num_steps(num_steps, T)
    ts = make_timesteps(num_timesteps=T, num_steps=num_steps, spacing=spacing)
  else:
    ts, prev_ts, final_ab = table.timesteps, table.prev_timesteps, table.final_alpha_bar
  n_full = sdedit_full_steps(sampler=sampler, num_steps=num_steps, num_timesteps=T)
  k = sdedit_num_steps(strength=strength, num_steps=n_full)
  t0 = ts[k - 1]
  x_t0 = diffusion.q_sample(
    schedule=schedule,
    x0=x_guide,
    t=jnp.full((B,), t0, jnp.int32),
    noise=jax.random.normal(jax.random.fold_in(key, 0), x_guide.shape, x_guide.dtype),
  )
  return x_t0, ts, k, mask, prev_ts, final_ab


def sdedit_step(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_guide: jnp.ndarray,
  mask: jnp.ndarray | None,
  x: jnp.ndarray,
  t,
  t_prev,
  key: jax.Array,
  cond: Any = None,
  sampler: str = "ddim",
  eta=0.0,
  variance: str = "small",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  final_alpha_bar=1.0,
  eps_from_clipped_x0: bool = True,
) -> jnp.ndarray:
  """One step of :func:`sdedit`'s reverse loop from ``t`` to ``t_prev`` (the sampler's step, then the
  unmasked region reset to the guide noised to ``t_prev`` with ``fold_in(key, 1)``). ``final_alpha_bar``
  and ``eps_from_clipped_x0`` are DDIM's (see :func:`diffjax.samplers.ddim.ddim_step`)."""
  if sampler == "ddpm":
    x_prev = ddpm_step(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_t=x,
      t=t,
      cond=cond,
      key=key,
      variance=variance,
      prediction=prediction,
      clip_x0=clip_x0,
    )
  else:
    x_prev = ddim_step(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_t=x,
      t=t,
      t_prev=t_prev,
      cond=cond,
      key=key,
      eta=eta,
      prediction=prediction,
      clip_x0=clip_x0,
      final_alpha_bar=final_alpha_bar,
      eps_from_clipped_x0=eps_from_clipped_x0,
    )
  if mask is None:
    return x_prev
  B = x.shape[0]
  noise = jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype)
  known = diffusion.q_sample(
    schedule=schedule, x0=x_guide, t=jnp.full((B,), jnp.maximum(t_prev, 0), jnp.int32), noise=noise
  )
  known = jnp.where(t_prev >= 0, known, x_guide)
  return mask * x_prev + (1.0 - mask) * known


def sdedit(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_guide: jnp.ndarray,
  key: jax.Array,
  strength,
  cond: Any = None,
  mask: jnp.ndarray | None = None,
  sampler: str = "ddim",
  num_steps=50,
  eta=0.0,
  spacing: str = "trailing",
  variance: str = "small",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  table: TimestepTable | None = None,
  eps_from_clipped_x0: bool = True,
) -> jnp.ndarray:
  """Edits ``x_guide`` ``[B, H, W, C]`` (model range [-1, 1]) by SDEdit.

  Args:
    model_fn: ``model_fn(params, x_t, t, cond)``; guidance and latent wrappers compose as usual.
    params: its parameters.
    schedule: its schedule (T timesteps).
    x_guide: the guide image(s).
    key: PRNG key: ``fold_in(key, 0)`` noises the guide, ``fold_in(key, 1)`` drives the reverse loop.
    strength: in (0, 1]; the fraction of the sampler's timesteps that is re-run (scalar, may be traced).
    cond: the condition passed to ``model_fn`` (class labels, text context, or None).
    mask: optional ``[B, H, W, 1]`` or ``[B, H, W, C]`` in [0, 1]; 1 = free to change, 0 = keep the guide.
      The kept region is the guide noised to the current time after every step and the guide itself
      at the end.
    sampler: "ddim" (``num_steps`` of ``spacing``, ``eta``) or "ddpm" (ancestral over all T steps;
      ``num_steps``, ``eta`` and ``spacing`` are ignored).
    num_steps: sampler steps for a full (strength 1) run; may be traced.
    eta: DDIM eta (scalar or ``[B]``).
    spacing: DDIM timestep spacing; "trailing" makes the first step t0 = strength * T - 1.
    variance: DDPM reverse variance, "small" or "large".
    prediction: the model's parameterisation.
    clip_x0: clip of the predicted clean image (None for none).
    table: DDIM only: an explicit timestep plan replacing ``spacing`` (e.g. a diffusers scheduler's, see
      :mod:`diffjax.pretrained.scheduler`); the edit re-runs its lowest ``ceil(strength * num_steps)``
      entries with the table's step targets and final alpha-bar.
    eps_from_clipped_x0: see :func:`diffjax.samplers.ddim.ddim_step`.

  Returns:
    The edited images, shaped like ``x_guide``.

  Raises:
    ValueError: for an unknown sampler, ``strength`` outside (0, 1], a bad step count, or a mask whose
      shape does not broadcast to ``x_guide``.
  """
  x_t0, ts, k, mask, prev_ts, final_ab = sdedit_setup(
    schedule=schedule, x_guide=x_guide, key=key, strength=strength, mask=mask, sampler=sampler,
    num_steps=num_steps, spacing=spacing, table=table,
  )

  def step_fn(x, t, t_prev, k_step):
    return sdedit_step(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_guide=x_guide,
      mask=mask,
      x=x,
      t=t,
      t_prev=t_prev,
      key=k_step,
      cond=cond,
      sampler=sampler,
      eta=eta,
      variance=variance,
      prediction=prediction,
      clip_x0=clip_x0,
      final_alpha_bar=final_ab,
      eps_from_clipped_x0=eps_from_clipped_x0,
    )

  return reverse_loop(
    step_fn=step_fn,
    x_T=x_t0,
    timesteps=ts,
    num_steps=k,
    key=jax.random.fold_in(key, 1),
    prev_timesteps=prev_ts,
  )
