"""DPM-Solver++(2M): multistep second-order ODE solver in data (x0) prediction.

With alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) and the half log-SNR lambda_t = log(alpha_t / sigma_t),
one step from timestep ``t`` (model estimate ``x0_t``) to ``t_prev`` with h = lambda_{t_prev} - lambda_t is

  x_{t_prev} = (sigma_{t_prev} / sigma_t) x_t + alpha_{t_prev} (1 - e^{-h}) D,
  D = x0_t + (h / (2 h_last)) (x0_t - x0_last),  h_last = lambda_t - lambda_{t_last},

where ``x0_last`` is the estimate of the previous step at ``t_last`` (Lu et al. 2022, Algorithm 2; the
"midpoint" form of diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``). With
D = x0_t the step is first order and equals DDIM with eta = 0. The first step has no history and is first
order. The last step goes to the clean end ``t_prev = -1`` (alpha = 1, sigma = 0, lambda = +inf): there
h / h_last is infinite, so the step is first order and returns the model's x0 estimate itself, as diffusers
does with ``final_sigmas_type="zero"`` (which also makes its ``lower_order_final`` moot for order 2).

One model call per step; the previous x0 estimate is carried through the ``fori_loop`` so that ``num_steps``
may be traced and a new step count does not recompile.

References:
  Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
    arXiv:2211.01095, Algorithm 2 (multistep second order).
  Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
    Steps", arXiv:2206.00927 (exponential integrators in lambda).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffjax import diffusion
from diffjax.losses import ModelFn
from diffjax.samplers.loop import alpha_bar_at, reverse_loop
from diffjax.samplers.timesteps import make_timesteps
from diffjax.schedules import Schedule


def half_log_snr(ab: jnp.ndarray) -> jnp.ndarray:
  """lambda = log(alpha / sigma) = (log ab - log(1 - ab)) / 2; +inf at ab = 1 (no NaN)."""
  return 0.5 * (jnp.log(ab) - jnp.log1p(-ab))


def dpm_solver_update(*, x_t, x0, x0_last, ab_t, ab_prev, ab_last, second_order):
  """One DPM-Solver++ update from ``t`` to ``t_prev`` given the x0 estimates at ``t`` and ``t_last``.

  Args:
    x_t: the sample at ``t``, ``[B, ...]``.
    x0: the model's x0 estimate at ``t``, shaped like ``x_t``.
    x0_last: the x0 estimate of the previous step (at ``t_last > t``), shaped like ``x_t``; unused when
      ``second_order`` is false.
    ab_t, ab_prev, ab_last: alpha-bar at ``t``, ``t_prev`` (1 at the clean end) and ``t_last`` (scalars).
    second_order: bool scalar (may be traced); taken as false at the clean end (``ab_prev == 1``) and
      when ``t_last`` is not noisier than ``t`` (a repeated timestep), where h / h_last is not finite.

  Returns:
    x_{t_prev}, shaped like ``x_t``.
  """
  lam_t, lam_prev, lam_last = half_log_snr(ab_t), half_log_snr(ab_prev), half_log_snr(ab_last)
  h = lam_prev - lam_t  # +inf at the clean end
  h_last = lam_t - lam_last
  use2 = second_order & (ab_prev < 1.0) & (h_last > 0.0)
  # Guard the ratio so that an unused branch holds no inf/NaN (also keeps gradients finite).
  ratio = jnp.where(use2, 0.5 * jnp.where(use2, h, 1.0) / jnp.where(use2, h_last, 1.0), 0.0)
  d = x0 + ratio.astype(x_t.dtype) * (x0 - x0_last)
  sigma_ratio = jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t))
  coef = jnp.sqrt(ab_prev) * -jnp.expm1(-h)  # alpha_{t_prev} (1 - e^{-h}); = 1 at the clean end
  return sigma_ratio.astype(x_t.dtype) * x_t + coef.astype(x_t.dtype) * d


def dpm_solver_sample(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: Any = None,
  num_steps=20,
  spacing: str = "trailing",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
) -> jnp.ndarray:
  """Samples with DPM-Solver++(2M) from noise ``x_T`` ``[B, H, W, C]`` (deterministic).

  Args:
    model_fn: ``model_fn(params, x_t, t, cond) -> prediction`` with ``t`` int ``[B]``.
    params: passed to ``model_fn``.
    schedule: the discrete schedule the model was trained with.
    x_T: standard normal noise ``[B, ...]``.
    key: unused by the solver (it is deterministic); kept for the samplers' common signature.
    cond: passed to ``model_fn``.
    num_steps: number of model calls in [1, T]; may be traced (a new count does not recompile).
    spacing: "trailing" (default; starts at t = T - 1 and equals diffusers' "trailing"), "quadratic" or
      "uniform" (see :func:`~diffjax.samplers.timesteps.make_timesteps`). "uniform" ends at t = 0, so its
      second-to-last step spans a long lambda interval with a large extrapolation h / (2 h_last); on
      Gaussian data it is then less accurate than DDIM at 10-20 steps.
    prediction: the model's parameterisation, "eps", "x0" or "v".
    clip_x0: if set, each x0 estimate is clipped to [-clip_x0, clip_x0] (static thresholding).

  Returns:
    The clean sample, shaped like ``x_T``.
  """
  ts = make_timesteps(num_timesteps=schedule.num_timesteps, num_steps=num_steps, spacing=spacing)
  ac = schedule.alphas_cumprod
  B = x_T.shape[0]

  def step_fn(state, t, t_prev, k):
    del k
    x, x0_last, t_last = state
    tb = jnp.full((B,), t, jnp.int32)
    out = model_fn(params, x, tb, cond).astype(x.dtype)
    x0, _ = diffusion.to_x0_eps(
      schedule=schedule, prediction=prediction, x_t=x, t=tb, output=out, clip_x0=clip_x0
    )
    x_prev = dpm_solver_update(
      x_t=x,
      x0=x0,
      x0_last=x0_last,
      ab_t=alpha_bar_at(ac, t),
      ab_prev=alpha_bar_at(ac, t_prev),
      ab_last=alpha_bar_at(ac, t_last),
      second_order=t_last >= 0,
    )
    # A zero-length step (t_prev == t, from a spacing that repeats timesteps) leaves x unchanged; keep
    # the older, distinct history so that the next step can still be second order.
    keep = t_prev == t
    return x_prev, jnp.where(keep, x0_last, x0), jnp.where(keep, t_last, t)

  # t_last = -1 marks "no previous step": the first step is first order.
  init = (x_T, jnp.zeros_like(x_T), jnp.asarray(-1, jnp.int32))
  x, _, _ = reverse_loop(step_fn=step_fn, x_T=init, timesteps=ts, num_steps=num_steps, key=key)
  return x
