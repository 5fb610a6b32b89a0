"""evaluate_samples on real digits: held-out digits score far better than noise."""

import numpy as np
import pytest

from diffjax.eval import evaluate_samples
from diffjax.eval.metrics import SampleScorer


@pytest.fixture(scope="module")
def real_vs_noise(digits_split, digits_judge):
  params, info = digits_judge
  train, held = digits_split
  kw = {"judge_params": params, "judge_info": info, "reference": train}
  real = evaluate_samples(held.images, held.labels, **kw)
  noise_images = np.random.default_rng(0).integers(0, 256, size=held.images.shape, dtype=np.uint8)
  noise = evaluate_samples(noise_images, held.labels, **kw)
  return real, noise


def test_heldout_digits_score_far_better_than_noise(real_vs_noise, digits_split):
  real, noise = real_vs_noise
  assert set(real) == {
    "frechet_distance",
    "precision",
    "recall",
    "class_accuracy",
    "num_samples",
    "num_reference",
  }
  assert real["num_samples"] == len(digits_split[1]) and real["num_reference"] == len(digits_split[0])
  assert real["frechet_distance"] < 0.1 * noise["frechet_distance"], (real, noise)
  assert real["precision"] > 0.8 and real["recall"] > 0.8, real
  assert noise["precision"] < 0.2, noise
  assert real["class_accuracy"] >= 0.95 and noise["class_accuracy"] < 0.5


def test_dropped_classes_lower_recall_not_precision(digits_split, digits_judge):
  params, info = digits_judge
  train, held = digits_split
  keep = held.labels < 3  # A "generator" that only produces 0, 1 and 2.
  out = evaluate_samples(held.images[keep], None, judge_params=params, judge_info=info, reference=train)
  assert "class_accuracy" not in out
  assert out["precision"] > 0.8 and out["recall"] < 0.5, out


@pytest.mark.parametrize(
  "images, labels, needle",
  [
    (np.zeros((10, 28, 28, 1), np.uint8), None, r"images have shape \[H, W, C\]=\[28, 28, 1\]"),
    (np.zeros((10, 8, 8, 1), np.float32), None, "images must have dtype uint8"),
    (np.zeros((10, 8, 8), np.uint8), None, "images must have rank 4"),
    (np.zeros((3, 8, 8, 1), np.uint8), None, "more than k=3 examples"),
    (np.zeros((10, 8, 8, 1), np.uint8), np.zeros(9, np.int32), r"labels must have shape \[N\]=\[10\]"),
    (np.zeros((10, 8, 8, 1), np.uint8), np.full(10, 10), r"labels must lie in \[0, 10\)"),
  ],
)
def test_bad_inputs_are_named(digits_split, digits_judge, images, labels, needle):
  params, info = digits_judge
  with pytest.raises(ValueError, match=needle):
    evaluate_samples(images, labels, judge_params=params, judge_info=info, reference=digits_split[0])


def test_scorer_reuses_reference_features_and_equals_evaluate_samples(digits_split, digits_judge):
  params, info = digits_judge
  train, held = digits_split
  scorer = SampleScorer(judge_params=params, judge_info=info, reference=train)
  assert scorer.reference_features.shape == (len(train), info["feature_dim"])
  first = held.subset(np.arange(200))
  second = held.subset(np.arange(100, 300))
  for part in (first, second):
    expected = evaluate_samples(
      part.images, part.labels, judge_params=params, judge_info=info, reference=train
    )
    assert scorer(part.images, part.labels) == pytest.approx(expected, rel=1e-6)
  unlabelled = scorer(first.images)
  assert "class_accuracy" not in unlabelled
  with pytest.raises(ValueError, match=r"images have shape \[H, W, C\]=\[4, 4, 1\]"):
    scorer(np.zeros((10, 4, 4, 1), np.uint8))
  with pytest.raises(ValueError, match="labels must have shape"):
    scorer(first.images, first.labels[:5])
