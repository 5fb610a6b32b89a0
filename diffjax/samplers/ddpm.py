"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over all T steps.

x_{t-1} = mu~(x0_hat, x_t) + sigma_t z with sigma_t^2 = beta-tilde_t ("small", the posterior
variance) or beta_t ("large"); no noise is added at the last step. An optional ``mean_shift_fn``
moves the mean, e.g. by classifier guidance's ``w Σ grad log p(y | x_t)`` (Dhariwal & Nichol 2021,
Algorithm 1; see :func:`diffjax.guidance.classifier.classifier_mean_shift`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax import diffusion
from diffjax.losses import ModelFn, reverse_log_variance
from diffjax.samplers.loop import reverse_loop
from diffjax.schedules import Schedule


def ddpm_step(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_t,
  t,
  cond,
  key,
  variance: str = "small",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  mean_shift_fn: Callable | None = None,
):
  """One ancestral step from scalar timestep ``t`` to ``t - 1``.

  ``mean_shift_fn(x_t, t [B], variance) -> [B, ...]``, if given, is added to the reverse mean;
  ``variance`` is the reverse variance sigma_t^2 broadcastable against ``x_t``.
  """
  B, nd = x_t.shape[0], x_t.ndim
  tb = jnp.full((B,), t, jnp.int32)
  out = model_fn(params, x_t, tb, cond).astype(x_t.dtype)
  x0, _ = diffusion.to_x0_eps(
    schedule=schedule, prediction=prediction, x_t=x_t, t=tb, output=out, clip_x0=clip_x0
  )
  mean, _, _ = diffusion.q_posterior(schedule=schedule, x0=x0, x_t=x_t, t=tb)
  logvar = reverse_log_variance(schedule=schedule, t=tb, ndim=nd, variance=variance)
  if mean_shift_fn is not None:
    mean = mean + mean_shift_fn(x_t, tb, jnp.exp(logvar)).astype(mean.dtype)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  return mean + jnp.where(t > 0, jnp.exp(0.5 * logvar), 0.0) * noise


def ddpm_sample(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: Any = None,
  variance: str = "small",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  mean_shift_fn: Callable | None = None,
) -> jnp.ndarray:
  """Samples with T ancestral steps from noise ``x_T`` ``[B, H, W, C]`` (``mean_shift_fn``: see :func:`ddpm_step`)."""
  T = schedule.num_timesteps

  def step_fn(x, t, t_prev, k):
    del t_prev
    return ddpm_step(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_t=x,
      t=t,
      cond=cond,
      key=k,
      variance=variance,
      prediction=prediction,
      clip_x0=clip_x0,
      mean_shift_fn=mean_shift_fn,
    )

  return reverse_loop(
    step_fn=step_fn, x_T=x_T, timesteps=jnp.arange(T, dtype=jnp.int32), num_steps=T, key=key
  )
