"""The pure DDIM update against Song, Meng & Ermon 2021, Eq. 12 (with sigma from Eq. 16), in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.samplers import ddim_sigma, ddim_step, ddim_update
from diffjax.schedules import make_schedule


def _eq12(*, x_t, eps, a_t, a_prev, eta, noise):
  """DDIM Eq. 12 written out from x_t and eps, sigma from Eq. 16 (NumPy, float64)."""
  x0 = (x_t - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
  sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t)) * np.sqrt(1.0 - a_t / a_prev)
  return np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_update_matches_eq12(eta):
  rng = np.random.default_rng(0)
  shape = (5, 4, 4, 3)
  x_t, eps, noise = (rng.standard_normal(shape) for _ in range(3))
  a_t = rng.uniform(0.05, 0.6, size=(5, 1, 1, 1))
  a_prev = a_t + rng.uniform(0.01, 0.39, size=(5, 1, 1, 1))  # the target step is less noisy
  want = _eq12(x_t=x_t, eps=eps, a_t=a_t, a_prev=a_prev, eta=eta, noise=noise)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x0 = (f32(x_t) - jnp.sqrt(1.0 - f32(a_t)) * f32(eps)) / jnp.sqrt(f32(a_t))
  sigma = ddim_sigma(ab_t=f32(a_t), ab_prev=f32(a_prev), eta=eta)
  got = ddim_update(x0=x0, eps=f32(eps), ab_prev=f32(a_prev), sigma=sigma, noise=f32(noise))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_ddim_update_without_noise_is_deterministic_update():
  rng = np.random.default_rng(1)
  x0, eps = (jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.float32) for _ in range(2))
  got = ddim_update(x0=x0, eps=eps, ab_prev=0.7, sigma=0.0)
  np.testing.assert_allclose(got, np.sqrt(0.7) * x0 + np.sqrt(0.3) * eps, rtol=1e-6, atol=1e-6)
  # at the clean end the update returns x0
  np.testing.assert_array_equal(ddim_update(x0=x0, eps=eps, ab_prev=1.0, sigma=0.0), x0)


def test_ddim_step_is_model_estimates_then_ddim_update():
  schedule = make_schedule("linear", num_timesteps=100)
  rng = np.random.default_rng(2)
  x_t = jnp.asarray(rng.standard_normal((2, 3, 3, 1)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((2, 3, 3, 1)), jnp.float32)
  key = jax.random.key(0)
  got = ddim_step(
    model_fn=lambda *_: eps, params=None, schedule=schedule, x_t=x_t, t=60, t_prev=40, cond=None, key=key,
    eta=0.8, clip_x0=None,
  )
  ab, ab_prev = np.float64(schedule.alphas_cumprod[60]), np.float64(schedule.alphas_cumprod[40])
  noise = np.asarray(jax.random.normal(key, x_t.shape, x_t.dtype), np.float64)
  x64, eps64 = np.asarray(x_t, np.float64), np.asarray(eps, np.float64)
  want = _eq12(x_t=x64, eps=eps64, a_t=ab, a_prev=ab_prev, eta=0.8, noise=noise)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
