"""k-NN manifold precision and recall (Kynkäänniemi et al. 2019)."""

import numpy as np
import pytest

from diffjax.eval import in_manifold, knn_radii, precision_recall


def test_knn_radii_by_hand():
  x = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_allclose(knn_radii(x, k=1), [1.0, 1.0, 2.0, 4.0])
  np.testing.assert_allclose(knn_radii(x, k=2), [3.0, 2.0, 3.0, 6.0])
  # Chunking does not change the result.
  np.testing.assert_allclose(knn_radii(x, k=2, chunk_size=1), knn_radii(x, k=2))


def test_precision_recall_by_hand():
  real = np.array([[0.0], [1.0], [2.0]])  # k=1 radii 1, 1, 1: real manifold is [-1, 3].
  fake = np.array([[0.5], [0.9], [5.0], [5.2]])  # k=1 radii 0.4, 0.4, 0.2, 0.2.
  p, r = precision_recall(real, fake, k=1)
  assert p == pytest.approx(2 / 4)  # 0.5 and 0.9 lie in [-1, 3]; 5.0 and 5.2 do not.
  assert r == pytest.approx(1 / 3)  # Only real 1.0 is within 0.4 of a fake (0.9); 0.0 is 0.5 from 0.5.
  np.testing.assert_array_equal(in_manifold(fake, real, knn_radii(real, k=1)), [True, True, False, False])


def _gaussian(rng, n, d, center):
  return rng.normal(size=(n, d)) + center


def test_same_distribution_gives_precision_and_recall_near_one():
  rng = np.random.default_rng(0)
  real, fake = _gaussian(rng, 2000, 4, 0.0), _gaussian(rng, 2000, 4, 0.0)
  p, r = precision_recall(real, fake, k=3, chunk_size=256)
  assert p > 0.9 and r > 0.9, (p, r)


def test_disjoint_distributions_give_zero():
  rng = np.random.default_rng(1)
  real, fake = _gaussian(rng, 1000, 4, 0.0), _gaussian(rng, 1000, 4, 50.0)
  assert precision_recall(real, fake) == (0.0, 0.0)


def test_sample_covering_one_mode_has_high_precision_low_recall():
  """Real data has two far-apart modes; the samples cover only one of them (mode dropping)."""
  rng = np.random.default_rng(2)
  real = np.concatenate([_gaussian(rng, 1000, 4, 0.0), _gaussian(rng, 1000, 4, 30.0)])
  fake = _gaussian(rng, 1000, 4, 0.0)
  p, r = precision_recall(real, fake, k=3)
  assert p > 0.9, p
  assert 0.35 < r < 0.55, r
  # Swapping roles swaps the metrics: now the samples are unrealistic half the time but cover everything.
  p2, r2 = precision_recall(fake, real, k=3)
  assert p2 == pytest.approx(r, abs=0.05) and r2 == pytest.approx(p, abs=0.05)


def test_chunk_size_does_not_change_results():
  rng = np.random.default_rng(3)
  real, fake = _gaussian(rng, 300, 5, 0.0), _gaussian(rng, 250, 5, 0.5)
  assert precision_recall(real, fake, chunk_size=7) == precision_recall(real, fake, chunk_size=10_000)
  assert precision_recall(real, fake, chunk_size=None) == precision_recall(real, fake, chunk_size=10_000)


@pytest.mark.parametrize(
  "real_shape, fake_shape, kwargs, needle",
  [
    ((10, 3), (10, 4), {}, "real_features and fake_features must have the same feature dimension"),
    ((3, 3), (10, 3), {}, "real_features needs more than k=3 samples"),
    ((10, 3), (2, 3), {}, "fake_features needs more than k=3 samples"),
    ((10, 3), (10, 3), {"k": 0}, "k must be an int >= 1"),
    ((10, 3), (10, 3), {"chunk_size": 0}, "chunk_size must be None or an int >= 1"),
    ((10,), (10, 3), {}, "real_features must be a non-empty 2-D array"),
  ],
)
def test_bad_inputs_name_the_argument(real_shape, fake_shape, kwargs, needle):
  rng = np.random.default_rng(4)
  with pytest.raises(ValueError, match=needle):
    precision_recall(rng.normal(size=real_shape), rng.normal(size=fake_shape), **kwargs)
