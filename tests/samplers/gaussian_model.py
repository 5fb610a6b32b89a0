"""The exact denoiser of Gaussian data N(mu, s^2 I): a closed-form model_fn for sampler tests."""

import jax.numpy as jnp

from diffjax import diffusion


def exact_model_fn(schedule, *, mu=0.3, s=0.5, prediction="eps"):
  def model_fn(params, x_t, t, cond):
    del params, cond
    ab = diffusion.gather(schedule.alphas_cumprod, t, x_t.ndim)
    # x_t = sqrt(ab) x0 + sqrt(1-ab) eps with x0 ~ N(mu, s^2): E[x0 | x_t] in closed form.
    var_t = ab * s**2 + (1 - ab)
    x0 = mu + jnp.sqrt(ab) * s**2 * (x_t - jnp.sqrt(ab) * mu) / var_t
    eps = diffusion.eps_from_x0(schedule=schedule, x_t=x_t, t=t, x0=x0)
    if prediction == "eps":
      return eps
    if prediction == "x0":
      return x0
    return diffusion.v_from_eps_x0(schedule=schedule, t=t, eps=eps, x0=x0)

  return model_fn
