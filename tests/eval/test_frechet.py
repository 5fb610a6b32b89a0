"""Fréchet distance (Heusel et al. 2017) against closed forms and scipy's matrix square root."""

import numpy as np
import pytest
import scipy.linalg

from diffjax.eval import (
  frechet_distance,
  frechet_distance_from_features,
  frechet_distance_infinity,
  gaussian_stats,
)


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_stats_are_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
  mu, sigma = gaussian_stats(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (4, 4)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)


def test_diagonal_covariances_match_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
  got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_general_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(2)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)
  # Symmetric in its arguments, and 0 for identical Gaussians.
  np.testing.assert_allclose(frechet_distance(mu2, s2, mu1, s1), expected, rtol=1e-8)
  assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_singular_covariance_is_handled():
  """Rank-deficient covariances (e.g. dead ReLU features) give the closed form, not NaN."""
  s1 = np.diag([2.0, 0.0, 1.0])
  s2 = np.diag([0.5, 0.0, 0.0])
  expected = (2 + 0.5 - 2 * 1.0) + 0 + 1.0
  np.testing.assert_allclose(frechet_distance(np.zeros(3), s1, np.zeros(3), s2), expected, rtol=1e-10)


def test_two_large_samples_of_one_gaussian_are_close_and_symmetric():
  rng = np.random.default_rng(3)
  d = 8
  mean, cov = rng.normal(size=d), _random_spd(rng, d)
  a = rng.multivariate_normal(mean, cov, size=20000)
  b = rng.multivariate_normal(mean, cov, size=20000)
  shifted = b + 1.0  # ||shift||^2 = d = 8.
  same = frechet_distance_from_features(a, b)
  assert same < 0.01
  assert frechet_distance_from_features(b, a) == pytest.approx(same, rel=1e-6, abs=1e-12)
  assert frechet_distance_from_features(a, shifted) == pytest.approx(8.0, rel=0.02)


@pytest.mark.parametrize(
  "a_shape, b_shape, needle",
  [
    ((10, 3), (10, 4), "features_a and features_b must have the same feature dimension"),
    ((1, 3), (10, 3), "features_a needs at least 2 samples"),
    ((10, 3), (1, 3), "features_b needs at least 2 samples"),
    ((10,), (10, 3), "features_a must be a 2-D array"),
  ],
)
def test_bad_feature_inputs_name_the_argument(a_shape, b_shape, needle):
  with pytest.raises(ValueError, match=needle):
    frechet_distance_from_features(np.ones(a_shape), np.ones(b_shape))


def test_bad_statistics_name_the_argument():
  with pytest.raises(ValueError, match="mu1 and mu2 must have the same dimension"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"sigma2 must be a \[D, D\] covariance"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="features needs at least 2 samples"):
    gaussian_stats(np.ones((1, 5)))


def _two_generators(seed):
  """Reference N(0, I) in 32-D; A = N(0, 1.5^2 I) (true FD 8.0), B = N(m, 0.6^2 I), |m|^2 = 3.38 (true FD 8.5)."""
  d = 32
  ref = np.random.default_rng(0).normal(size=(40000, d))
  r = np.random.default_rng(10 + seed)
  m = np.zeros(d)
  m[0] = np.sqrt(3.38)
  return ref, 1.5 * r.normal(size=(2000, d)), m + 0.6 * r.normal(size=(2000, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_infinity_removes_the_small_sample_bias(seed):
  ref, a, b = _two_generators(seed)
  ra = frechet_distance_infinity(a, ref, seed=seed)
  rb = frechet_distance_infinity(b, ref, seed=seed)
  assert ra["sizes"][0] == 500 and ra["sizes"][-1] == 2000 and len(ra["frechet_distances"]) == 8
  # Small samples rank the wider generator A worse; the distributions rank it better (8.0 < 8.5).
  assert ra["frechet_distances"][0] > rb["frechet_distances"][0]
  assert ra["frechet_distance_infinity"] < rb["frechet_distance_infinity"]
  for got, true in ((ra, 8.0), (rb, 8.5)):
    assert abs(got["frechet_distance_infinity"] - true) < 0.25
    assert abs(got["frechet_distance_infinity"] - true) < abs(got["frechet_distance"] - true)
    assert got["slope"] > 0  # the finite-sample bias is positive
  np.testing.assert_allclose(ra["frechet_distance"], frechet_distance_from_features(a, ref), rtol=1e-12)


def test_frechet_distance_infinity_rejects_bad_arguments():
  x = np.random.default_rng(0).normal(size=(40, 3))
  with pytest.raises(ValueError, match="sizes"):
    frechet_distance_infinity(x, x, sizes=[10, 50])
  with pytest.raises(ValueError, match="sizes"):
    frechet_distance_infinity(x, x, sizes=[20])
  with pytest.raises(ValueError, match="draws"):
    frechet_distance_infinity(x, x, draws=0)
  with pytest.raises(ValueError, match="reference_features"):
    frechet_distance_infinity(x, x[:, :2])
