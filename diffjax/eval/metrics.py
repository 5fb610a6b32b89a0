"""One call that scores generated images against real data with a trained judge.

Reported metrics (all on judge features, so comparable only between runs using the same judge):

* ``frechet_distance``: Fréchet distance between Gaussians fitted to the sample and reference features
  (FID-style, Heusel et al. 2017); lower is better.
* ``precision`` / ``recall``: k-NN manifold precision and recall (Kynkäänniemi et al. 2019); higher is
  better.
* ``class_accuracy``: fraction of samples the judge assigns to the class they were generated for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffjax.data import ImageDataset, validate_images
from diffjax.eval.frechet import frechet_distance_from_features
from diffjax.eval.judge import features_and_logits
from diffjax.eval.precision_recall import precision_recall

__all__ = ["SampleScorer", "evaluate_samples"]


def _check_labels(labels, *, num_images: int, num_classes: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (num_images,):
    raise ValueError(f"labels must have shape [N]=[{num_images}] (one per image), got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}")
  if num_images and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  return y.astype(np.int64)


class SampleScorer:
  """Scores batches of generated images against one reference set, computing its features once.

  Sweeps (steps, guidance weights, samplers) score many sample sets against the same real data; the
  scorer runs the judge over ``reference`` once and reuses its features and Gaussian fit.

  Args:
      judge_params: Judge parameters from :func:`train_judge` or :func:`load_judge`.
      judge_info: The judge's info dict (needs ``image_shape`` and ``num_classes``).
      reference: Real images (e.g. the data the generator was trained on) with the judge's image shape.
      k: Neighbour rank for precision/recall.

  Raises:
      ValueError: Naming ``reference`` when its image shape does not fit the judge or it has too few images.
  """

  def __init__(
    self,
    *,
    judge_params: dict[str, Any],
    judge_info: dict[str, Any],
    reference: ImageDataset,
    k: int = 3,
  ):
    self.judge_params = judge_params
    self.image_shape = tuple(int(d) for d in judge_info["image_shape"])
    self.num_classes = int(judge_info["num_classes"])
    self.k = int(k)
    if reference.image_shape != self.image_shape:
      raise ValueError(
        f"reference {reference.name!r} has images [H, W, C]={list(reference.image_shape)} but the judge "
        f"expects {list(self.image_shape)}"
      )
    if len(reference) <= self.k:
      raise ValueError(f"reference needs more than k={self.k} examples, got {len(reference)}")
    self.num_reference = len(reference)
    self.reference_features, _ = features_and_logits(judge_params, reference.images)

  def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Scores ``images`` (``uint8 [N, H, W, C]``, N > k) generated for ``labels`` (``int [N]`` or ``None``).

    Returns:
        Dict with ``frechet_distance``, ``precision``, ``recall`` (floats), ``class_accuracy`` (float,
        only if ``labels`` is given), ``num_samples`` and ``num_reference`` (ints).
    """
    validate_images(images, name="images")
    if images.shape[1:] != self.image_shape:
      raise ValueError(
        f"images have shape [H, W, C]={list(images.shape[1:])} but the judge expects {list(self.image_shape)}"
      )
    n = images.shape[0]
    if n <= self.k:
      raise ValueError(f"images need more than k={self.k} examples, got {n}")
    y = None if labels is None else _check_labels(labels, num_images=n, num_classes=self.num_classes)
    sample_feats, sample_logits = features_and_logits(self.judge_params, images)
    precision, recall = precision_recall(self.reference_features, sample_feats, k=self.k)
    result: dict[str, Any] = {
      "frechet_distance": frechet_distance_from_features(sample_feats, self.reference_features),
      "precision": precision,
      "recall": recall,
    }
    if y is not None:
      result["class_accuracy"] = float(np.mean(np.argmax(sample_logits, axis=1) == y))
    result["num_samples"] = int(n)
    result["num_reference"] = self.num_reference
    return result


def evaluate_samples(
  images: np.ndarray,
  labels: np.ndarray | None,
  *,
  judge_params: dict[str, Any],
  judge_info: dict[str, Any],
  reference: ImageDataset,
  k: int = 3,
) -> dict[str, Any]:
  """Scores ``images`` against ``reference`` with the judge's features (one-off :class:`SampleScorer`).

  Args:
      images: Generated ``uint8 [N, H, W, C]`` images, N > k, ``[H, W, C]`` equal to the judge's
          ``image_shape``.
      labels: ``int [N]`` classes the images were generated for, or ``None`` (unconditional; no
          ``class_accuracy``).
      judge_params: Judge parameters from :func:`train_judge` or :func:`load_judge`.
      judge_info: The judge's info dict (needs ``image_shape`` and ``num_classes``).
      reference: Real images (e.g. the data the generator was trained on) with the same image shape.
      k: Neighbour rank for precision/recall.

  Returns:
      Dict with ``frechet_distance``, ``precision``, ``recall`` (floats), ``class_accuracy`` (float,
      only if ``labels`` is given), ``num_samples`` and ``num_reference`` (ints).

  Raises:
      ValueError: Naming ``images``, ``labels`` or ``reference`` when shapes or dtypes do not fit the
          judge, or when there are too few images.
  """
  validate_images(images, name="images")
  judge_shape = tuple(int(d) for d in judge_info["image_shape"])
  if images.shape[1:] != judge_shape:
    raise ValueError(
      f"images have shape [H, W, C]={list(images.shape[1:])} but the judge expects {list(judge_shape)}"
    )
  n = images.shape[0]
  if n <= k or len(reference) <= k:
    raise ValueError(f"images and reference need more than k={k} examples each, got {n} and {len(reference)}")
  scorer = SampleScorer(judge_params=judge_params, judge_info=judge_info, reference=reference, k=k)
  return scorer(images, labels)
