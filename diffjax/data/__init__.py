"""Data loading for diffjax: in-memory image datasets and deterministic batching."""

from diffjax.data.pipeline import (
  Prefetcher,
  batch_indices,
  epoch_permutation,
  get_batch,
  to_model_range,
  to_uint8,
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
  "ImageDataset",
  "Prefetcher",
  "batch_indices",
  "epoch_permutation",
  "get_batch",
  "load_dataset",
  "load_digits",
  "load_mnist_idx",
  "load_tfds",
  "split_holdout",
  "to_model_range",
  "to_uint8",
  "validate_images",
]
