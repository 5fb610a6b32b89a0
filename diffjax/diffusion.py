"""The forward process, its posterior, and conversions between model parameterisations.

Pure keyword-only functions over explicit arrays. Images are ``[B, ...]``; timesteps ``t`` are
int ``[B]``. Per-timestep coefficients are gathered from a :class:`~diffjax.schedules.Schedule` and
broadcast over the trailing image axes.

References:
  Ho et al. 2020, DDPM: q(x_t | x_0) (Eq. 4) and the posterior q(x_{t-1} | x_t, x_0) (Eq. 6-7).
  Salimans & Ho 2022, "Progressive Distillation": the v parameterisation, v = a eps - s x_0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> str:
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r} is not one of {PREDICTIONS}")
  return prediction


def gather(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """``table[t]`` reshaped to ``[B, 1, ..., 1]`` so it broadcasts against a rank-``ndim`` batch."""
  t = jnp.asarray(t)
  vals = table[t]
  if vals.ndim == 0:
    return vals
  return vals.reshape(vals.shape + (1,) * (ndim - 1))


def _alpha_sigma(schedule: Schedule, t, ndim):
  ab = gather(schedule.alphas_cumprod, t, ndim)
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def q_sample(*, schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) with the given standard noise."""
  a, s = _alpha_sigma(schedule, t, x0.ndim)
  return a * x0 + s * noise


def q_mean_variance(*, schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and log-variance of q(x_t | x_0)."""
  ab = gather(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ab) * x0, 1.0 - ab, jnp.log(1.0 - ab)


def q_posterior(*, schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)."""
  nd = x_t.ndim
  mean = (
    gather(schedule.posterior_mean_coef_x0, t, nd) * x0 + gather(schedule.posterior_mean_coef_xt, t, nd) * x_t
  )
  var = gather(schedule.posterior_variance, t, nd)
  logvar = gather(schedule.posterior_log_variance_clipped, t, nd)
  return mean, var, logvar


def x0_from_eps(*, schedule: Schedule, x_t, t, eps):
  a, s = _alpha_sigma(schedule, t, x_t.ndim)
  return (x_t - s * eps) / a


def eps_from_x0(*, schedule: Schedule, x_t, t, x0):
  a, s = _alpha_sigma(schedule, t, x_t.ndim)
  return (x_t - a * x0) / s


def v_from_eps_x0(*, schedule: Schedule, t, eps, x0):
  a, s = _alpha_sigma(schedule, t, x0.ndim)
  return a * eps - s * x0


def x0_from_v(*, schedule: Schedule, x_t, t, v):
  a, s = _alpha_sigma(schedule, t, x_t.ndim)
  return a * x_t - s * v


def eps_from_v(*, schedule: Schedule, x_t, t, v):
  a, s = _alpha_sigma(schedule, t, x_t.ndim)
  return s * x_t + a * v


def to_x0_eps(*, schedule: Schedule, prediction: str, x_t, t, output, clip_x0: float | None = None):
  """Converts a model output of any parameterisation to the pair (x0, eps).

  Args:
    schedule: the diffusion schedule.
    prediction: what ``output`` is: "eps", "x0" or "v".
    x_t: noisy input ``[B, ...]``.
    t: int timesteps ``[B]``.
    output: the model's prediction, same shape as ``x_t``.
    clip_x0: if set, x0 is clipped to [-clip_x0, clip_x0] and eps recomputed from it, as in DDPM's
      sampler (data lives in [-1, 1]).

  Returns:
    (x0, eps), each shaped like ``x_t``.
  """
  check_prediction(prediction)
  if prediction == "eps":
    eps = output
    x0 = x0_from_eps(schedule=schedule, x_t=x_t, t=t, eps=eps)
  elif prediction == "x0":
    x0 = output
    eps = eps_from_x0(schedule=schedule, x_t=x_t, t=t, x0=x0)
  else:
    x0 = x0_from_v(schedule=schedule, x_t=x_t, t=t, v=output)
    eps = eps_from_v(schedule=schedule, x_t=x_t, t=t, v=output)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = eps_from_x0(schedule=schedule, x_t=x_t, t=t, x0=x0)
  return x0, eps


def training_target(*, schedule: Schedule, prediction: str, x0, t, noise):
  """The regression target of a model with the given parameterisation."""
  check_prediction(prediction)
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  return v_from_eps_x0(schedule=schedule, t=t, eps=noise, x0=x0)


def sample_timesteps(key: jax.Array, *, batch_size: int, num_timesteps: int) -> jnp.ndarray:
  """Uniform int timesteps ``[batch_size]`` in [0, num_timesteps)."""
  return jax.random.randint(key, (batch_size,), 0, num_timesteps)
