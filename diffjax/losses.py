"""Training losses and the variational bound (negative log-likelihood in bits/dim).

Every function consumes ``model_fn(params, x_t, t, cond) -> prediction`` where the prediction is of
the parameterisation named by ``prediction`` ("eps", "x0" or "v").

References:
  Ho et al. 2020, DDPM: the simple loss (Eq. 14), the bound L = L_T + sum_t L_{t-1} + L_0 (Eq. 5) and
    the discretised Gaussian decoder (Eq. 13).
  Nichol & Dhariwal 2021, Improved DDPM: the "large" variance choice beta_t for the reverse process.
  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": min(SNR, gamma).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffjax import diffusion
from diffjax.schedules import Schedule

ModelFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
WEIGHTINGS = ("none", "min_snr")
VARIANCES = ("small", "large")


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _sum_flat(x):
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def loss_weight(
  *, schedule: Schedule, t, prediction: str, weighting: str = "none", min_snr_gamma: float = 5.0
) -> jnp.ndarray:
  """Per-example weight ``[B]`` applied to the mean squared error in the target's space.

  "min_snr" weights the x0-space error by min(SNR, gamma); expressed in the target's space that is
  min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v.
  """
  diffusion.check_prediction(prediction)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
  if weighting == "none":
    return jnp.ones(jnp.shape(t), jnp.float32)
  snr = schedule.snr[t]
  clipped = jnp.minimum(snr, min_snr_gamma)
  return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def diffusion_loss(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x0: jnp.ndarray,
  cond: Any,
  key: jax.Array,
  prediction: str = "eps",
  weighting: str = "none",
  min_snr_gamma: float = 5.0,
):
  """The denoising regression loss averaged over a batch.

  Args:
    model_fn: ``(params, x_t, t, cond) -> prediction``.
    params: model parameters.
    schedule: the diffusion schedule.
    x0: clean data ``[B, H, W, C]`` in [-1, 1].
    cond: conditioning passed through to ``model_fn`` (e.g. int labels ``[B]``) or None.
    key: PRNG key for t and the noise.
    prediction: the model's parameterisation.
    weighting: "none" (DDPM's simple loss) or "min_snr".
    min_snr_gamma: gamma of the min-SNR weighting.

  Returns:
    (loss, per_example_loss ``[B]``).
  """
  kt, kn = jax.random.split(key)
  t = diffusion.sample_timesteps(kt, batch_size=x0.shape[0], num_timesteps=schedule.num_timesteps)
  noise = jax.random.normal(kn, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
  target = diffusion.training_target(schedule=schedule, prediction=prediction, x0=x0, t=t, noise=noise)
  out = model_fn(params, x_t, t, cond)
  w = loss_weight(
    schedule=schedule, t=t, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
  )
  per_example = w * _mean_flat(jnp.square(out.astype(jnp.float32) - target))
  return jnp.mean(per_example), per_example


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(x, *, mean, log_scale):
  """log p(x) elementwise for data on the 256-level grid in [-1, 1] (DDPM Eq. 13).

  The edge bins extend to -inf and +inf. ``log_scale`` is log of the standard deviation.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (centered + 1.0 / 255.0)
  lower = inv_std * (centered - 1.0 / 255.0)
  log_cdf_upper = log_ndtr(upper)
  log_one_minus_cdf_lower = log_ndtr(-lower)
  # log(Phi(upper) - Phi(lower)) without cancellation: in the upper tail use the mirrored form
  # Phi(-lower) - Phi(-upper); then log(a - b) = log a + log1p(-b / a). The ratio is capped below 1
  # so a bin narrower than float32 resolves still gets a finite (very small) probability.
  mirror = (upper + lower) > 0
  hi = jnp.where(mirror, log_ndtr(-lower), log_cdf_upper)
  lo = jnp.where(mirror, log_ndtr(-upper), log_ndtr(lower))
  log_delta = hi + jnp.log1p(-jnp.minimum(jnp.exp(lo - hi), 1.0 - 1e-6))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_delta))


def reverse_log_variance(*, schedule: Schedule, t, ndim: int, variance: str = "small"):
  """log of the fixed reverse-process variance: beta-tilde_t ("small") or beta_t ("large")."""
  if variance not in VARIANCES:
    raise ValueError(f"variance={variance!r} is not one of {VARIANCES}")
  if variance == "small":
    table = schedule.posterior_log_variance_clipped
  else:
    table = jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
  return diffusion.gather(table, t, ndim)


def prior_kl(*, schedule: Schedule, x0) -> jnp.ndarray:
  """L_T = KL(q(x_T | x_0) || N(0, I)) summed over dimensions, nats ``[B]``."""
  T = schedule.num_timesteps
  t = jnp.full((x0.shape[0],), T - 1, jnp.int32)
  mean, _, logvar = diffusion.q_mean_variance(schedule=schedule, x0=x0, t=t)
  return _sum_flat(normal_kl(mean, logvar, jnp.zeros_like(mean), jnp.zeros_like(mean)))


def vlb_term(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x0,
  t,
  noise,
  cond,
  prediction: str = "eps",
  variance: str = "small",
) -> jnp.ndarray:
  """One term of the bound for each example, nats ``[B]``.

  For t > 0 this is L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0 it is the
  decoder term L_0 = -log p(x_0 | x_1) under the discretised Gaussian.
  """
  nd = x0.ndim
  x_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
  out = model_fn(params, x_t, t, cond).astype(jnp.float32)
  x0_hat, _ = diffusion.to_x0_eps(
    schedule=schedule, prediction=prediction, x_t=x_t, t=t, output=out, clip_x0=1.0
  )
  model_mean, _, _ = diffusion.q_posterior(schedule=schedule, x0=x0_hat, x_t=x_t, t=t)
  model_logvar = reverse_log_variance(schedule=schedule, t=t, ndim=nd, variance=variance)
  true_mean, _, true_logvar = diffusion.q_posterior(schedule=schedule, x0=x0, x_t=x_t, t=t)
  kl = _sum_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar))
  decoder_nll = -_sum_flat(
    discretized_gaussian_log_likelihood(x0, mean=model_mean, log_scale=0.5 * model_logvar)
  )
  return jnp.where(t == 0, decoder_nll, kl)


def nll_bits_per_dim(
  *,
  model_fn: ModelFn,
  params,
  schedule: Schedule,
  x0,
  cond,
  key: jax.Array,
  prediction: str = "eps",
  variance: str = "small",
  num_t_samples: int | None = None,
) -> dict:
  """Negative log-likelihood bound in bits per dimension for each example.

  With ``num_t_samples=None`` every term t = 0..T-1 is evaluated (exact bound, T forward passes).
  Otherwise L_0 is evaluated exactly and the sum of the KL terms t = 1..T-1 is estimated without
  bias from ``num_t_samples`` stratified timesteps (one uniform draw in each of ``num_t_samples``
  quadratically spaced strata of [1, T), weighted by the stratum's width).

  Args:
    x0: data ``[B, H, W, C]`` on the 256-level grid in [-1, 1].
    key: PRNG key for the noise (and timesteps when sampled).

  Returns:
    dict with "bpd" ``[B]``, "prior_bpd" ``[B]`` and "terms_bpd" ``[B]`` (the sum of L_0..L_{T-1}).
  """
  T = schedule.num_timesteps
  B = x0.shape[0]
  dims = math.prod(x0.shape[1:])
  to_bits = 1.0 / (dims * math.log(2.0))
  if num_t_samples is None:
    ts, weights = jnp.arange(T), jnp.ones((T,), jnp.float32)
  else:
    if not 1 <= num_t_samples <= T - 1:
      raise ValueError(f"num_t_samples must be in [1, {T - 1}], got {num_t_samples}")
    # L_0 (the largest, least smooth term) exactly; the KL terms t = 1..T-1 by stratified sampling.
    # Strata are quadratically spaced (narrow near t = 1, where the terms are large and steep); a
    # draw from stratum [e_k, e_{k+1}) is weighted by its width, which keeps the estimate unbiased.
    edges = 1.0 + (T - 1.0) * jnp.square(jnp.linspace(0.0, 1.0, num_t_samples + 1))
    widths = edges[1:] - edges[:-1]
    u = jax.random.uniform(jax.random.fold_in(key, 1), (num_t_samples,))
    sampled = jnp.clip(jnp.floor(edges[:-1] + u * widths), 1, T - 1).astype(jnp.int32)
    ts = jnp.concatenate([jnp.zeros((1,), jnp.int32), sampled])
    weights = jnp.concatenate([jnp.ones((1,)), widths])

  def body(total, i_t_w):
    i, t, w = i_t_w
    noise = jax.random.normal(jax.random.fold_in(key, i + 2), x0.shape, x0.dtype)
    term = vlb_term(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x0=x0,
      t=jnp.full((B,), t, jnp.int32),
      noise=noise,
      cond=cond,
      prediction=prediction,
      variance=variance,
    )
    return total + w * term, None

  terms, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), (jnp.arange(ts.shape[0]), ts, weights))
  prior = prior_kl(schedule=schedule, x0=x0)
  return {"bpd": (prior + terms) * to_bits, "prior_bpd": prior * to_bits, "terms_bpd": terms * to_bits}
