"""Evaluation of generated images: Fréchet distance, precision/recall and class accuracy on judge features.

Standard FID on Inception-v3 features, for users with the weights on disk: :mod:`diffjax.eval.inception`.
"""

from diffjax.eval.frechet import (
  frechet_distance,
  frechet_distance_from_features,
  frechet_distance_infinity,
  gaussian_stats,
)
from diffjax.eval.inception import (
  INCEPTION_FEATURE_DIM,
  INCEPTION_SIZE,
  FIDInceptionV3,
  inception_features,
  load_inception,
)
from diffjax.eval.judge import FEATURE_DIM, JudgeCNN, features, features_and_logits, logits, train_judge
from diffjax.eval.judge_io import load_judge, save_judge
from diffjax.eval.metrics import evaluate_samples
from diffjax.eval.precision_recall import in_manifold, knn_radii, precision_recall

__all__ = [
  "FEATURE_DIM",
  "INCEPTION_FEATURE_DIM",
  "INCEPTION_SIZE",
  "FIDInceptionV3",
  "JudgeCNN",
  "evaluate_samples",
  "features",
  "features_and_logits",
  "frechet_distance",
  "frechet_distance_from_features",
  "frechet_distance_infinity",
  "gaussian_stats",
  "in_manifold",
  "inception_features",
  "knn_radii",
  "load_inception",
  "load_judge",
  "logits",
  "precision_recall",
  "save_judge",
  "train_judge",
]
