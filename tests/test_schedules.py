import math

import numpy as np
import pytest

from diffjax.schedules import make_schedule, schedule_from_betas


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
def test_alpha_bar_is_cumulative_product(kind):
  s = make_schedule(kind, num_timesteps=50)
  betas = np.asarray(s.betas, np.float64)
  ab = np.ones(50)
  acc = 1.0
  for i, b in enumerate(betas):
    acc *= 1.0 - b
    ab[i] = acc
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-4)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], ab[:-1], rtol=1e-5)
  assert s.alphas_cumprod_prev[0] == 1.0
  np.testing.assert_allclose(s.snr, ab / (1 - ab), rtol=1e-4)


def test_linear_endpoints_match_ddpm():
  s = make_schedule("linear", num_timesteps=1000)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-4, 0.02], rtol=1e-5)
  # Ho et al.: alpha-bar_T ~ 4e-5 for the linear schedule with T=1000.
  assert 1e-5 < float(s.alphas_cumprod[-1]) < 1e-4


def test_cosine_matches_closed_form():
  T, s_off = 1000, 0.008
  s = make_schedule("cosine", num_timesteps=T)
  f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
  for t in [0, 10, 500, 900]:
    np.testing.assert_allclose(s.alphas_cumprod[t], f(t + 1) / f(0), rtol=1e-4)


def test_scaled_linear_is_linear_in_sqrt_beta():
  s = make_schedule("scaled_linear", num_timesteps=10)
  r = np.sqrt(np.asarray(s.betas, np.float64))
  np.testing.assert_allclose(np.diff(r), np.full(9, np.diff(r)[0]), rtol=1e-4)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [0.00085, 0.012], rtol=1e-5)


def test_posterior_tables_closed_form():
  s = make_schedule("linear", num_timesteps=100)
  b, ab, abp = (np.asarray(v, np.float64) for v in (s.betas, s.alphas_cumprod, s.alphas_cumprod_prev))
  np.testing.assert_allclose(s.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(s.posterior_mean_coef_x0, np.sqrt(abp) * b / (1 - ab), rtol=1e-4)
  np.testing.assert_allclose(s.posterior_mean_coef_xt, np.sqrt(1 - b) * (1 - abp) / (1 - ab), rtol=1e-4)
  assert np.all(np.isfinite(s.posterior_log_variance_clipped))


@pytest.mark.parametrize(
  "bad",
  [dict(kind="quadratic"), dict(num_timesteps=1), dict(num_timesteps=2.5), dict(kind="linear", beta_end=2.0)],
)
def test_bad_arguments(bad):
  kind = bad.pop("kind", "linear")
  with pytest.raises(ValueError, match="kind|num_timesteps|beta"):
    make_schedule(kind, **bad)


def test_schedule_from_betas_rejects_2d():
  with pytest.raises(ValueError, match="betas"):
    schedule_from_betas(np.ones((2, 2)) * 0.1)
