"""Fréchet distance between Gaussians fitted to feature sets.

The Fréchet (2-Wasserstein) distance between ``N(mu1, S1)`` and ``N(mu2, S2)`` is

    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

With Inception-v3 pool features it is the FID of Heusel et al. 2017 ("GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium"); ``diffjax`` applies it to the features of a small
judge classifier (:mod:`diffjax.eval.judge`), so values are comparable only between evaluations that
use the same judge.

``Tr (S1 S2)^{1/2}`` is computed without a general (complex) matrix square root:
``S1 S2`` is similar to the symmetric PSD matrix ``A = S1^{1/2} S2 S1^{1/2}``, so its eigenvalues are
those of ``A`` and ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A))``. Both steps use ``numpy.linalg.eigh``
on symmetric matrices; round-off negative eigenvalues are clipped to 0.

The Fréchet distance of ``N`` samples is a biased estimate of the distance between the distributions,
and the bias (about ``c / N``, ``c`` depending on the generator) differs between generators, so two
models compared at small ``N`` can rank the other way round at large ``N``.
:func:`frechet_distance_infinity` removes it as Chong & Forsyth 2020 do for FID ("Effectively Unbiased FID
and Inception Score and where to find them", FID-infinity): it evaluates the distance on subsets of
several sizes, fits ``FD(N) = FD_inf + c / N`` by least squares and reports the intercept.
"""

from __future__ import annotations

import numpy as np

__all__ = [
  "frechet_distance",
  "frechet_distance_from_features",
  "frechet_distance_infinity",
  "gaussian_stats",
]


def _as_features(features, *, name: str) -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {x.shape[0]}")
  if x.shape[1] < 1:
    raise ValueError(f"{name} must have at least 1 feature dimension, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def gaussian_stats(features, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of a feature set.

  Args:
      features: ``[N, D]`` array (N >= 2), any real dtype.
      name: Argument name used in error messages.

  Returns:
      ``(mu, sigma)``: float64 ``[D]`` mean and float64 ``[D, D]`` covariance with divisor ``N - 1``.

  Raises:
      ValueError: If ``features`` is not 2-D, has fewer than 2 rows, or holds non-finite values.
  """
  x = _as_features(features, name=name)
  mu = x.mean(axis=0)
  centered = x - mu
  sigma = centered.T @ centered / (x.shape[0] - 1)
  return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix ``[D, D]`` (negative eigenvalues clipped)."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu, sigma, *, mu_name: str, sigma_name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1:
    raise ValueError(f"{mu_name} must be a 1-D mean vector [D], got shape {mu.shape}")
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
      f"{sigma_name} must be a [D, D] covariance matching {mu_name} (D={mu.shape[0]}), got shape {sigma.shape}"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{mu_name}/{sigma_name} contain NaN or infinite values")
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between two Gaussians (Heusel et al. 2017).

  Args:
      mu1: ``[D]`` mean of the first Gaussian.
      sigma1: ``[D, D]`` symmetric PSD covariance of the first Gaussian.
      mu2: ``[D]`` mean of the second Gaussian.
      sigma2: ``[D, D]`` symmetric PSD covariance of the second Gaussian.

  Returns:
      ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` as a Python float, clipped at 0
      (it is non-negative in exact arithmetic). Symmetric in its two Gaussians up to round-off.

  Raises:
      ValueError: If shapes are not ``[D]``/``[D, D]``, the two dimensions differ, or values are not finite.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, mu_name="mu1", sigma_name="sigma1")
  mu2, sigma2 = _check_stats(mu2, sigma2, mu_name="mu2", sigma_name="sigma2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 and mu2 must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
  sigma1 = 0.5 * (sigma1 + sigma1.T)
  sigma2 = 0.5 * (sigma2 + sigma2.T)
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
  diff = mu1 - mu2
  value = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * trace_sqrt
  return max(value, 0.0)


def frechet_distance_from_features(features_a, features_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets.

  Args:
      features_a: ``[N_a, D]`` features (N_a >= 2).
      features_b: ``[N_b, D]`` features (N_b >= 2, same D).

  Returns:
      The Fréchet distance of :func:`frechet_distance` between their :func:`gaussian_stats`.

  Raises:
      ValueError: Naming ``features_a``/``features_b`` if one is malformed or the feature dims differ.
  """
  a = _as_features(features_a, name="features_a")
  b = _as_features(features_b, name="features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f"features_a and features_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
    )
  return frechet_distance(*gaussian_stats(a, name="features_a"), *gaussian_stats(b, name="features_b"))


def frechet_distance_infinity(
  features,
  reference_features,
  *,
  sizes=None,
  draws: int = 5,
  seed: int = 0,
) -> dict:
  """Fréchet distance extrapolated to infinitely many samples (FD-infinity, Chong & Forsyth 2020).

  For each subset size ``N`` in ``sizes`` it averages the Fréchet distance between ``draws`` random
  ``N``-row subsets of ``features`` (without replacement; one draw when ``N`` is all of them) and the
  whole ``reference_features``, then fits ``FD(N) = FD_inf + slope / N`` by least squares.

  Args:
      features: ``[N_a, D]`` features of the generated samples.
      reference_features: ``[N_b, D]`` features of the reference (real) data, used whole.
      sizes: Increasing subset sizes, each in ``[2, N_a]``, at least two distinct; default 8 sizes
          evenly spaced from ``N_a // 4`` to ``N_a``.
      draws: Random subsets averaged per size (>= 1).
      seed: Seed of the subset draws.

  Returns:
      Dict with ``frechet_distance_infinity`` (the intercept), ``slope`` (``c``), ``sizes`` and the
      mean ``frechet_distances`` at each size (lists), and ``frechet_distance`` at ``N_a`` (all rows).

  Raises:
      ValueError: Naming ``features``/``reference_features`` if malformed or of different dimension,
          ``sizes`` if a size is out of range or fewer than two distinct sizes are given, ``draws`` if < 1.
  """
  a = _as_features(features, name="features")
  b = _as_features(reference_features, name="reference_features")
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f"features and reference_features must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
    )
  n = a.shape[0]
  if sizes is None:
    sizes = np.linspace(max(2, n // 4), n, 8)
  sizes = sorted({int(v) for v in np.asarray(sizes).ravel()})
  if len(sizes) < 2 or sizes[0] < 2 or sizes[-1] > n:
    raise ValueError(
      f"sizes must hold at least two distinct subset sizes in [2, {n}] (the rows of features), got {sizes}"
    )
  if int(draws) < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  mu_b, sigma_b = gaussian_stats(b, name="reference_features")
  rng = np.random.default_rng(seed)
  means = []
  for size in sizes:
    reps = 1 if size == n else int(draws)
    values = [
      frechet_distance(*gaussian_stats(a[rng.choice(n, size, replace=False)]), mu_b, sigma_b)
      for _ in range(reps)
    ]
    means.append(float(np.mean(values)))
  slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=np.float64), np.asarray(means), 1)
  return {
    "frechet_distance_infinity": float(intercept),
    "slope": float(slope),
    "sizes": sizes,
    "frechet_distances": means,
    "frechet_distance": means[-1] if sizes[-1] == n else frechet_distance(*gaussian_stats(a), mu_b, sigma_b),
  }
