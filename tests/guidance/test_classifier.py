"""Classifier guidance against closed forms: a two-class Gaussian mixture with exact denoisers and posterior.

Data: class y in {0, 1} (equally likely), x_0 | y ~ N(mu_y, s^2 I). Then x_t | y ~ N(a mu_y, v I) with
a = sqrt(ᾱ_t), v = a^2 s^2 + 1 - ᾱ_t, and eps(x_t) = -sqrt(1 - ᾱ_t) grad log p(x_t). With the exact
unconditional eps and the exact posterior p(y | x_t), classifier guidance at w = 1 must give the exact
class-conditional eps (Dhariwal & Nichol 2021, Sec. 4.2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import diffusion
from diffjax.guidance.classifier import classifier_grad, classifier_guidance, classifier_mean_shift
from diffjax.samplers import ddim_sample, ddpm_sample, ddpm_step
from diffjax.schedules import make_schedule

SCHEDULE = make_schedule("linear", num_timesteps=50)
MU = jnp.array([-0.6, 0.5])
S = 0.3


def _moments(t, nd):
  ab = diffusion.gather(SCHEDULE.alphas_cumprod, t, nd)
  return jnp.sqrt(ab), ab * S**2 + 1.0 - ab, jnp.sqrt(1.0 - ab)


def log_lik(x_t, t):
  """``[B, 2]``: log N(x_t; a mu_y, v I) summed over pixels (up to a constant shared by the classes)."""
  a, v, _ = _moments(t, x_t.ndim)
  per_class = [jnp.sum(-0.5 * (x_t - a * m) ** 2 / v, axis=(1, 2, 3)) for m in MU]
  return jnp.stack(per_class, -1)


def classifier_fn(params, x_t, t):
  del params
  return log_lik(x_t, t)  # logits = exact log-likelihoods, so softmax is the exact posterior


def uncond_eps(params, x_t, t, cond):
  assert cond is None
  _, _, sig = _moments(t, x_t.ndim)
  score = jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(log_lik(x, t), axis=-1)))(x_t)
  return -sig * score


def cond_eps(x_t, t, y):
  a, v, sig = _moments(t, x_t.ndim)
  return sig * (x_t - a * MU[y][:, None, None, None]) / v


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_at_w1_gives_the_exact_conditional_model(prediction):
  key = jax.random.key(0)
  x = jax.random.normal(key, (4, 2, 3, 1))
  t = jnp.array([0, 10, 30, 49])
  y = jnp.array([0, 1, 1, 0])

  def base(params, x_t, t, cond):
    eps = uncond_eps(params, x_t, t, cond)
    x0 = diffusion.x0_from_eps(schedule=SCHEDULE, x_t=x_t, t=t, eps=eps)
    return {"eps": eps, "x0": x0, "v": diffusion.v_from_eps_x0(schedule=SCHEDULE, t=t, eps=eps, x0=x0)}[
      prediction
    ]

  guided = classifier_guidance(
    base,
    classifier_fn=classifier_fn,
    classifier_params=None,
    schedule=SCHEDULE,
    guidance_scale=1.0,
    prediction=prediction,
  )
  out = guided(None, x, t, y)
  _, eps = diffusion.to_x0_eps(schedule=SCHEDULE, prediction=prediction, x_t=x, t=t, output=out)
  np.testing.assert_allclose(eps, cond_eps(x, t, y), atol=2e-5)
  # Per-sample w: w = 0 rows are the unconditional model, w = 2 rows move twice as far.
  w = jnp.array([0.0, 1.0, 2.0, 0.0])
  g = classifier_guidance(
    uncond_eps, classifier_fn=classifier_fn, classifier_params=None, schedule=SCHEDULE, guidance_scale=w
  )(None, x, t, y)
  u = uncond_eps(None, x, t, None)
  np.testing.assert_allclose(g[0], u[0], atol=1e-6)
  np.testing.assert_allclose(g[2] - u[2], 2 * (cond_eps(x, t, y)[2] - u[2]), atol=2e-5)


def test_classifier_grad_is_the_posterior_score():
  x = jax.random.normal(jax.random.key(1), (3, 2, 2, 1))
  t, y = jnp.array([5, 20, 40]), jnp.array([1, 0, 1])
  g = classifier_grad(classifier_fn, None, x, t, y)
  a, v, _ = _moments(t, 4)
  post = jax.nn.softmax(log_lik(x, t), -1)  # d/dx log p(y|x) = d/dx log p(x|y) - sum_k p(k|x) d/dx log p(x|k)
  dlog = [-(x - a * m) / v for m in MU]
  want = jnp.stack(dlog)[y, jnp.arange(3)] - sum(post[:, k, None, None, None] * dlog[k] for k in range(2))
  np.testing.assert_allclose(g, want, atol=1e-5)


def test_ddpm_mean_shift_and_ddim_sampling():
  x = jax.random.normal(jax.random.key(2), (2, 2, 2, 1))
  y = jnp.array([0, 1])
  key = jax.random.key(3)
  w = jnp.array([3.0, 0.5])
  shift = classifier_mean_shift(
    classifier_fn=classifier_fn, classifier_params=None, labels=y, guidance_scale=w
  )
  plain = ddpm_step(model_fn=uncond_eps, params=None, schedule=SCHEDULE, x_t=x, t=20, cond=None, key=key)
  shifted = ddpm_step(
    model_fn=uncond_eps, params=None, schedule=SCHEDULE, x_t=x, t=20, cond=None, key=key, mean_shift_fn=shift
  )
  tb = jnp.full((2,), 20)
  var = SCHEDULE.posterior_variance[20]
  want = w[:, None, None, None] * var * classifier_grad(classifier_fn, None, x, tb, y)
  np.testing.assert_allclose(shifted - plain, want, rtol=1e-4, atol=1e-6)

  # Guided sampling pulls samples to the requested class's mean (guidance 3: sharper than the class).
  x_T = jax.random.normal(key, (64, 1, 1, 1))
  labels = jnp.arange(64) % 2
  means = MU[labels][:, None, None, None]
  big = classifier_mean_shift(
    classifier_fn=classifier_fn, classifier_params=None, labels=labels, guidance_scale=3.0
  )
  a = ddpm_sample(model_fn=uncond_eps, params=None, schedule=SCHEDULE, x_T=x_T, key=key, mean_shift_fn=big)
  guided = classifier_guidance(
    uncond_eps, classifier_fn=classifier_fn, classifier_params=None, schedule=SCHEDULE, guidance_scale=3.0
  )
  b = ddim_sample(
    model_fn=guided, params=None, schedule=SCHEDULE, x_T=x_T, key=key, cond=labels, num_steps=25
  )
  for s in (a, b):
    assert float(jnp.mean(jnp.abs(s - means) < 3 * S)) > 0.95
  un = ddim_sample(model_fn=uncond_eps, params=None, schedule=SCHEDULE, x_T=x_T, key=key, num_steps=25)
  assert float(jnp.mean(jnp.abs(un - means) < 3 * S)) < 0.8


def test_wrong_shapes_raise():
  x = jnp.zeros((3, 2, 2, 1))
  t, y = jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32)
  for bad in (jnp.ones(2), jnp.ones((3, 1))):
    g = classifier_guidance(
      uncond_eps, classifier_fn=classifier_fn, classifier_params=None, schedule=SCHEDULE, guidance_scale=bad
    )
    with pytest.raises(ValueError, match=r"guidance_scale must be a scalar or shaped \[B\]=\(3,\)"):
      g(None, x, t, y)
    shift = classifier_mean_shift(
      classifier_fn=classifier_fn, classifier_params=None, labels=y, guidance_scale=bad
    )
    with pytest.raises(ValueError, match="guidance_scale must be"):
      shift(x, t, 1.0)
  with pytest.raises(ValueError, match="labels must be"):
    classifier_grad(classifier_fn, None, x, t, jnp.zeros(2, jnp.int32))
