"""k-NN manifold precision and recall (Kynkäänniemi et al. 2019).

"Improved Precision and Recall Metric for Assessing Generative Models" estimates the support of a
distribution from samples: the manifold of a feature set ``Phi`` is the union of balls centred at each
``phi in Phi`` with radius ``||phi - NN_k(phi)||``, the distance to its k-th nearest neighbour in
``Phi`` (the point itself excluded). Then

* precision = fraction of generated features inside the manifold of the real features
  (are samples realistic?), and
* recall = fraction of real features inside the manifold of the generated features
  (is the real distribution covered?).

Pairwise distances are computed exactly (float64) in row blocks of ``[rows, M]``; by default ``rows`` is
chosen so that a block holds about 4M entries (32 MiB), so memory stays bounded for any set sizes. Time
is ``O(N_r^2 + N_f^2 + N_r N_f)`` distance evaluations, so for very large reference sets pass a random
``subset`` of the reference (the paper uses 50k images per set).
"""

from __future__ import annotations

import numpy as np

__all__ = ["in_manifold", "knn_radii", "precision_recall"]

_BLOCK_ENTRIES = 1 << 22


def _as_features(features, *, name: str) -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def _block_rows(chunk_size, num_columns: int) -> int:
  """Rows per distance block: ``chunk_size``, or about ``_BLOCK_ENTRIES / num_columns`` if None."""
  if chunk_size is None:
    return max(1, _BLOCK_ENTRIES // max(num_columns, 1))
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
    raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
  return int(chunk_size)


def _sq_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances ``[len(a), len(b)]``, clipped at 0 against round-off."""
  d = np.sum(a * a, axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features, *, k: int = 3, chunk_size: int | None = None, name: str = "features") -> np.ndarray:
  """Distance from each point to its k-th nearest neighbour in the same set (itself excluded).

  Args:
      features: ``[N, D]`` features with N > k.
      k: Neighbour rank (>= 1).
      chunk_size: Rows per distance block; ``None`` bounds a block to about 4M entries.
      name: Argument name used in error messages.

  Returns:
      float64 ``[N]`` radii. Duplicate points count as neighbours at distance 0.

  Raises:
      ValueError: If ``k`` is not an int in ``[1, N - 1]`` or the features are malformed.
  """
  x = _as_features(features, name=name)
  chunk_size = _block_rows(chunk_size, x.shape[0])
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  if x.shape[0] <= k:
    raise ValueError(f"{name} needs more than k={k} samples for k-NN radii, got {x.shape[0]}")
  x_sq = np.sum(x * x, axis=1)
  radii = np.empty(x.shape[0], dtype=np.float64)
  for start in range(0, x.shape[0], chunk_size):
    stop = min(start + chunk_size, x.shape[0])
    d = _sq_distances(x[start:stop], x, x_sq)
    d[np.arange(stop - start), np.arange(start, stop)] = 0.0  # Self distance exactly 0.
    # Sorted position 0 is the point itself, so position k is its k-th neighbour.
    radii[start:stop] = np.sqrt(np.partition(d, k, axis=1)[:, k])
  return radii


def in_manifold(
  queries,
  support,
  radii,
  *,
  chunk_size: int | None = None,
  names: tuple[str, str] = ("queries", "support"),
) -> np.ndarray:
  """Whether each query lies in the union of balls ``B(support_j, radii_j)``.

  Args:
      queries: ``[Q, D]`` features to test.
      support: ``[M, D]`` ball centres.
      radii: ``[M]`` ball radii (non-negative).
      chunk_size: Query rows per distance block; ``None`` bounds a block to about 4M entries.
      names: Argument names used in error messages.

  Returns:
      bool ``[Q]``: True where some ``||query - support_j|| <= radii_j``.

  Raises:
      ValueError: On malformed inputs or mismatched feature dimensions.
  """
  q = _as_features(queries, name=names[0])
  s = _as_features(support, name=names[1])
  chunk_size = _block_rows(chunk_size, s.shape[0])
  r = np.asarray(radii, dtype=np.float64)
  if r.shape != (s.shape[0],):
    raise ValueError(f"radii must have shape [{s.shape[0]}] (one per {names[1]} row), got {r.shape}")
  if q.shape[1] != s.shape[1]:
    raise ValueError(
      f"{names[0]} and {names[1]} must have the same feature dimension, got {q.shape[1]} and {s.shape[1]}"
    )
  s_sq = np.sum(s * s, axis=1)
  r_sq = r * r
  inside = np.empty(q.shape[0], dtype=bool)
  for start in range(0, q.shape[0], chunk_size):
    stop = min(start + chunk_size, q.shape[0])
    inside[start:stop] = np.any(_sq_distances(q[start:stop], s, s_sq) <= r_sq[None, :], axis=1)
  return inside


def precision_recall(
  real_features, fake_features, *, k: int = 3, chunk_size: int | None = None
) -> tuple[float, float]:
  """Improved precision and recall of Kynkäänniemi et al. 2019.

  Args:
      real_features: ``[N_r, D]`` features of real (reference) data, N_r > k.
      fake_features: ``[N_f, D]`` features of generated samples, N_f > k.
      k: Neighbour rank that sets each ball's radius (the paper uses 3).
      chunk_size: Rows per distance block (memory ``chunk_size * max(N_r, N_f) * 8`` bytes); ``None``
          bounds a block to about 4M entries (32 MiB).

  Returns:
      ``(precision, recall)`` floats in ``[0, 1]``.

  Raises:
      ValueError: Naming ``real_features``/``fake_features`` if malformed, too few, or of different dims.
  """
  real = _as_features(real_features, name="real_features")
  fake = _as_features(fake_features, name="fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(
      "real_features and fake_features must have the same feature dimension, got "
      f"{real.shape[1]} and {fake.shape[1]}"
    )
  real_radii = knn_radii(real, k=k, chunk_size=chunk_size, name="real_features")
  fake_radii = knn_radii(fake, k=k, chunk_size=chunk_size, name="fake_features")
  names = ("fake_features", "real_features")
  precision = in_manifold(fake, real, real_radii, chunk_size=chunk_size, names=names).mean()
  recall = in_manifold(real, fake, fake_radii, chunk_size=chunk_size, names=names[::-1]).mean()
  return float(precision), float(recall)
