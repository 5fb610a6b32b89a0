"""Data loading for diffjax: in-memory image datasets, deterministic batching, captions and scenes."""

from diffjax.data.captions import DIGIT_TEMPLATES, caption_digit, caption_labels
from diffjax.data.pipeline import (
  Prefetcher,
  batch_indices,
  epoch_permutation,
  get_batch,
  to_model_range,
  to_uint8,
)
from diffjax.data.scenes import (
  SCENE_TEMPLATES,
  SceneDataset,
  digits_as_mnist,
  judge_scenes,
  make_scenes,
  scene_caption,
  scene_halves,
  score_scenes,
)
from diffjax.data.sources import (
  ImageDataset,
  load_dataset,
  load_digits,
  load_mnist_idx,
  load_tfds,
  split_holdout,
  validate_images,
)

__all__ = [
  "DIGIT_TEMPLATES",
  "SCENE_TEMPLATES",
  "ImageDataset",
  "Prefetcher",
  "SceneDataset",
  "batch_indices",
  "caption_digit",
  "caption_labels",
  "digits_as_mnist",
  "epoch_permutation",
  "get_batch",
  "judge_scenes",
  "load_dataset",
  "load_digits",
  "load_mnist_idx",
  "load_tfds",
  "make_scenes",
  "scene_caption",
  "scene_halves",
  "score_scenes",
  "split_holdout",
  "to_model_range",
  "to_uint8",
  "validate_images",
]
