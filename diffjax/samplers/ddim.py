"""DDIM sampling (Song, Meng & Ermon 2021), eta in [0, 1], on any timestep subset.

x_{t'} = sqrt(ab_{t'}) x0_hat + sqrt(1 - ab_{t'} - sigma^2) eps_hat + sigma z, with
sigma = eta * sqrt((1 - ab_{t'}) / (1 - ab_t)) * sqrt(1 - ab_t / ab_{t'})  (DDIM Eq. 12 and 16).
eta = 0 is deterministic; eta = 1 over all T steps is DDPM's ancestral sampler with the posterior
variance beta-tilde.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffjax import diffusion
from diffjax.losses import ModelFn
from diffjax.samplers.loop import alpha_bar_at, reverse_loop
from diffjax.samplers.timesteps import TimestepTable, make_timesteps
from diffjax.schedules import Schedule


def ddim_sigma(*, ab_t, ab_prev, eta):
  """The DDIM noise scale sigma_t(eta) between alpha-bars ab_t and ab_prev."""
  return eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * jnp.sqrt(jnp.maximum(1.0 - ab_t / ab_prev, 0.0))


def ddim_update(*, x0, eps, ab_prev, sigma, noise=None):
  """The DDIM update from estimates ``(x0, eps)`` to the step with alpha-bar ``ab_prev`` (DDIM Eq. 12).

  ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise`` (the direction term's
  radicand floored at 0).

  Args:
    x0: ``[B, ...]`` predicted clean sample.
    eps: ``[B, ...]`` predicted noise.
    ab_prev: alpha-bar of the target step (1 at the clean end); a scalar or broadcastable to ``x0``.
    sigma: the step's noise scale (:func:`ddim_sigma`; 0 for the deterministic sampler); a scalar or
      broadcastable to ``x0``.
    noise: ``[B, ...]`` standard normal noise, or None for no noise term (``sigma`` then only shrinks
      the direction term).

  Returns:
    x_prev, shaped like ``x0``.
  """
  x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - jnp.square(sigma), 0.0)) * eps
  return x_prev if noise is None else x_prev + sigma * noise


def ddim_step(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_t,
  t,
  t_prev,
  cond,
  key,
  eta=0.0,
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  final_alpha_bar=1.0,
  eps_from_clipped_x0: bool = True,
):
  """One DDIM update from scalar timestep ``t`` to ``t_prev`` (``-1`` = clean).

  Args:
    x_t: ``[B, H, W, C]``. t, t_prev: int scalars (may be traced). eta: scalar or ``[B]``.
    final_alpha_bar: alpha-bar at ``t_prev = -1`` (1 = the clean end; diffusers' ``DDIMScheduler`` with
      ``set_alpha_to_one=False`` uses ``alphas_cumprod[0]``). May be traced.
    eps_from_clipped_x0: with ``clip_x0``, recompute eps from the clipped x0 (DDPM's convention, the
      default); False keeps the model's eps while x0 is clipped (diffusers' ``DDIMScheduler.step`` with
      ``use_clipped_model_output=False``).

  Returns:
    x_{t_prev}, shaped like ``x_t``.
  """
  B, nd = x_t.shape[0], x_t.ndim
  tb = jnp.full((B,), t, jnp.int32)
  out = model_fn(params, x_t, tb, cond).astype(x_t.dtype)
  x0, eps = diffusion.to_x0_eps(
    schedule=schedule,
    prediction=prediction,
    x_t=x_t,
    t=tb,
    output=out,
    clip_x0=clip_x0 if eps_from_clipped_x0 else None,
  )
  if clip_x0 is not None and not eps_from_clipped_x0:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
  ab_t = alpha_bar_at(schedule.alphas_cumprod, t)
  ab_prev = jnp.where(
    t_prev >= 0, alpha_bar_at(schedule.alphas_cumprod, t_prev), jnp.asarray(final_alpha_bar, jnp.float32)
  )
  # a static eta = 0 (a Python number) draws no noise: sigma is 0, and the sampler skips the RNG work
  deterministic = isinstance(eta, (int, float)) and eta == 0
  eta = jnp.asarray(eta, x_t.dtype)
  eta = eta.reshape(eta.shape + (1,) * (nd - eta.ndim)) if eta.ndim else eta
  sigma = ddim_sigma(ab_t=ab_t, ab_prev=ab_prev, eta=eta)
  noise = None if deterministic else jax.random.normal(key, x_t.shape, x_t.dtype)
  return ddim_update(x0=x0, eps=eps, ab_prev=ab_prev, sigma=sigma, noise=noise)


def ddim_sample(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: Any = None,
  num_steps=50,
  eta=0.0,
  spacing: str = "uniform",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  table: TimestepTable | None = None,
  eps_from_clipped_x0: bool = True,
) -> jnp.ndarray:
  """Samples with DDIM from noise ``x_T`` ``[B, H, W, C]``.

  ``num_steps`` (in [1, T]) and ``eta`` (scalar or ``[B]``) may be traced: changing them does not
  recompile a jitted caller. ``spacing`` is "uniform", "quadratic" or "trailing"; an explicit ``table``
  (e.g. a diffusers scheduler's, :mod:`diffjax.pretrained.scheduler`) replaces it, with its own
  step targets and final alpha-bar. ``eps_from_clipped_x0``: see :func:`ddim_step`.
  """
  if table is None:
    ts = make_timesteps(num_timesteps=schedule.num_timesteps, num_steps=num_steps, spacing=spacing)
    prev_ts, final_ab = None, 1.0
  else:
    ts, prev_ts, final_ab = table.timesteps, table.prev_timesteps, table.final_alpha_bar

  def step_fn(x, t, t_prev, k):
    return ddim_step(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_t=x,
      t=t,
      t_prev=t_prev,
      cond=cond,
      key=k,
      eta=eta,
      prediction=prediction,
      clip_x0=clip_x0,
      final_alpha_bar=final_ab,
      eps_from_clipped_x0=eps_from_clipped_x0,
    )

  return reverse_loop(
    step_fn=step_fn, x_T=x_T, timesteps=ts, num_steps=num_steps, key=key, prev_timesteps=prev_ts
  )
