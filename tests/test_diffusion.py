import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import diffusion
from diffjax.schedules import make_schedule

S = make_schedule("linear", num_timesteps=1000)


def test_q_sample_statistics():
  key = jax.random.key(0)
  x0 = jnp.full((20000, 2), 0.7)
  t = jnp.full((20000,), 300)
  noise = jax.random.normal(key, x0.shape)
  xt = np.asarray(diffusion.q_sample(schedule=S, x0=x0, t=t, noise=noise))
  ab = float(S.alphas_cumprod[300])
  np.testing.assert_allclose(xt.mean(), np.sqrt(ab) * 0.7, atol=0.01)
  np.testing.assert_allclose(xt.var(), 1 - ab, rtol=0.03)


def test_posterior_matches_bayes_rule_numerically():
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): check mean/var by completing the square."""
  t = 400
  x0, xt = 0.3, -0.2
  a, ab_prev = float(S.alphas[t]), float(S.alphas_cumprod_prev[t])
  b = 1 - a
  prec = a / b + 1 / (1 - ab_prev)
  mean = (np.sqrt(a) * xt / b + np.sqrt(ab_prev) * x0 / (1 - ab_prev)) / prec
  m, v, _ = diffusion.q_posterior(schedule=S, x0=jnp.array([[x0]]), x_t=jnp.array([[xt]]), t=jnp.array([t]))
  np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-4)
  np.testing.assert_allclose(float(v[0, 0]), 1 / prec, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction):
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (4, 3, 3, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 500, 999])
  xt = diffusion.q_sample(schedule=S, x0=x0, t=t, noise=eps)
  target = diffusion.training_target(schedule=S, prediction=prediction, x0=x0, t=t, noise=eps)
  x0_hat, eps_hat = diffusion.to_x0_eps(schedule=S, prediction=prediction, x_t=xt, t=t, output=target)
  # x0 from eps at t=999 amplifies rounding by 1/sqrt(ab) ~ 150; compare where it is well conditioned.
  np.testing.assert_allclose(x0_hat[:3], x0[:3], atol=2e-4)
  np.testing.assert_allclose(eps_hat[1:], eps[1:], atol=2e-4)


def test_v_definition():
  x0, eps, t = jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.array([100])
  v = diffusion.v_from_eps_x0(schedule=S, t=t, eps=eps, x0=x0)
  np.testing.assert_allclose(v, -np.sqrt(1 - float(S.alphas_cumprod[100])) * np.ones((1, 2)), rtol=1e-6)


def test_bad_prediction():
  with pytest.raises(ValueError, match="prediction"):
    diffusion.check_prediction("score")
