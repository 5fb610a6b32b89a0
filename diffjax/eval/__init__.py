"""Evaluation of generated images: Fréchet distance, precision/recall and class accuracy on judge features."""

from diffjax.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats
from diffjax.eval.judge import FEATURE_DIM, JudgeCNN, features, features_and_logits, logits, train_judge
from diffjax.eval.judge_io import load_judge, save_judge
from diffjax.eval.metrics import evaluate_samples
from diffjax.eval.precision_recall import in_manifold, knn_radii, precision_recall

__all__ = [
  "FEATURE_DIM",
  "JudgeCNN",
  "evaluate_samples",
  "features",
  "features_and_logits",
  "frechet_distance",
  "frechet_distance_from_features",
  "gaussian_stats",
  "in_manifold",
  "knn_radii",
  "load_judge",
  "logits",
  "precision_recall",
  "save_judge",
  "train_judge",
]
