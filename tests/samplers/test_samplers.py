import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.samplers import ddim_sample, ddim_sigma, ddpm_sample, make_timesteps
from diffjax.schedules import make_schedule
from tests.samplers.gaussian_model import exact_model_fn

S = make_schedule("linear", num_timesteps=200)
MU, SD = 0.3, 0.5


def _x_T(n=4000, key=0):
  return jax.random.normal(jax.random.key(key), (n, 2, 2, 1))


def test_ddim_eta1_variance_is_ddpm_posterior_variance():
  ab = np.asarray(S.alphas_cumprod)
  ab_prev = np.asarray(S.alphas_cumprod_prev)
  sig = ddim_sigma(ab_t=ab, ab_prev=ab_prev, eta=1.0)
  np.testing.assert_allclose(np.square(sig), S.posterior_variance, rtol=1e-4, atol=1e-9)


def test_ddim_eta1_over_all_steps_equals_ddpm_small():
  mf = exact_model_fn(S, mu=MU, s=SD)
  x_T, key = _x_T(64), jax.random.key(3)
  a = ddim_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=key, num_steps=200, eta=1.0)
  b = ddpm_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=key, variance="small")
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_ddim_eta0_is_deterministic():
  mf = exact_model_fn(S)
  x_T = _x_T(16)
  a = ddim_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=jax.random.key(1), num_steps=20)
  b = ddim_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=jax.random.key(2), num_steps=20)
  np.testing.assert_array_equal(a, b)
  c = ddim_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=jax.random.key(2), num_steps=20, eta=1.0)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-2


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_recover_gaussian_data(sampler, prediction):
  mf = exact_model_fn(S, mu=MU, s=SD, prediction=prediction)
  kw = dict(
    model_fn=mf,
    params=None,
    schedule=S,
    x_T=_x_T(),
    key=jax.random.key(0),
    prediction=prediction,
    clip_x0=None,
  )
  x = ddim_sample(num_steps=50, **kw) if sampler == "ddim" else ddpm_sample(**kw)
  x = np.asarray(x)
  assert abs(x.mean() - MU) < 0.03
  assert abs(x.std() - SD) < 0.03


def test_jit_and_eager_agree_and_steps_do_not_recompile():
  mf = exact_model_fn(S)
  x_T = _x_T(8)

  def run(n, eta, key):
    return ddim_sample(model_fn=mf, params=None, schedule=S, x_T=x_T, key=key, num_steps=n, eta=eta)

  jitted = jax.jit(run)
  key = jax.random.key(5)
  eager = run(10, 0.5, key)
  np.testing.assert_allclose(jitted(10, 0.5, key), eager, atol=1e-5)
  out20 = jitted(20, 0.5, key)
  jitted(30, 0.0, key)
  assert jitted._cache_size() == 1
  assert float(jnp.max(jnp.abs(out20 - eager))) > 1e-4


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
@pytest.mark.parametrize("n", [1, 10, 50, 200])
def test_timesteps(spacing, n):
  ts = np.asarray(make_timesteps(num_timesteps=200, num_steps=n, spacing=spacing))[:n]
  assert ts.shape == (n,) and ts.min() >= 0 and ts.max() <= 199
  assert np.all(np.diff(ts) >= 0)
  if spacing == "uniform":
    np.testing.assert_array_equal(ts, (np.arange(n) * 200) // n)
  if spacing == "quadratic" and n > 1:
    np.testing.assert_array_equal(ts, (np.linspace(0, np.sqrt(160), n) ** 2).astype(int))
  if spacing == "trailing":
    assert ts[-1] == 199
  if n == 200 and spacing != "quadratic":
    np.testing.assert_array_equal(ts, np.arange(200))


@pytest.mark.parametrize("n", [0, 201])
def test_steps_out_of_range(n):
  with pytest.raises(ValueError, match="num_steps"):
    make_timesteps(num_timesteps=200, num_steps=n)
  with pytest.raises(ValueError, match="num_steps"):
    ddim_sample(
      model_fn=exact_model_fn(S), params=None, schedule=S, x_T=_x_T(2), key=jax.random.key(0), num_steps=n
    )
