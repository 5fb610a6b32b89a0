"""Patches of real photographs (scikit-learn's two sample images) and padding for autoencoder training.

``sklearn.datasets.load_sample_images()`` ships two 427x640 RGB photographs (``china.jpg``,
``flower.jpg``), so no download is needed. Each image is split by columns: the right-most
``holdout_fraction`` of the columns is held out, and training patches are drawn only from the rest, so
no held-out pixel is ever seen in training. Held-out patches tile the held-out strip without overlap.
"""

from __future__ import annotations

import numpy as np

from diffjax.data.sources import ImageDataset

__all__ = ["load_photo_patches", "pad_images", "sample_photographs"]


def sample_photographs() -> list[np.ndarray]:
  """The two scikit-learn sample photographs as ``uint8 [427, 640, 3]`` arrays."""
  from sklearn.datasets import load_sample_images  # Local: sklearn import is slow.

  return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def _as_dataset(patches: np.ndarray, name: str) -> ImageDataset:
  return ImageDataset(
    images=np.ascontiguousarray(patches), labels=np.zeros(len(patches), np.int32), num_classes=1, name=name
  )


def load_photo_patches(
  *,
  patch_size: int = 32,
  num_train: int = 20000,
  holdout_fraction: float = 0.2,
  seed: int = 0,
  photos: list[np.ndarray] | None = None,
) -> tuple[ImageDataset, ImageDataset]:
  """Random training patches and tiled held-out patches from disjoint column ranges of each photograph.

  Args:
      patch_size: Side ``P`` of the square patches.
      num_train: Number of training patches, split evenly over the photographs; each is a random crop
          from the training columns, flipped left-right with probability 1/2.
      holdout_fraction: Fraction of each photograph's columns (on the right) kept for held-out patches.
      seed: Seed of the crop positions and flips.
      photos: ``uint8 [H, W, 3]`` images to use instead of the scikit-learn ones.

  Returns:
      ``(train, heldout)`` :class:`ImageDataset` s of ``uint8 [N, P, P, 3]`` patches with label 0; the
      held-out set tiles each held-out strip with non-overlapping patches, row by row.

  Raises:
      ValueError: If the training or held-out region of a photograph is smaller than one patch.
  """
  if not 0.0 < holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
  photos = sample_photographs() if photos is None else photos
  rng = np.random.default_rng(seed)
  p = patch_size
  train, held = [], []
  for i, img in enumerate(photos):
    h, w, _ = img.shape
    split = round(w * (1.0 - holdout_fraction))
    if min(h, split, w - split) < p:
      raise ValueError(f"photograph {i} ({h}x{w}) is too small for {p}x{p} patches with this split")
    n = num_train // len(photos) + (i < num_train % len(photos))
    ys = rng.integers(0, h - p + 1, size=n)
    xs = rng.integers(0, split - p + 1, size=n)
    flips = rng.random(n) < 0.5
    for y, x, f in zip(ys, xs, flips, strict=True):
      patch = img[y : y + p, x : x + p]
      train.append(patch[:, ::-1] if f else patch)
    for y in range(0, h - p + 1, p):
      for x in range(split, w - p + 1, p):
        held.append(img[y : y + p, x : x + p])
  return _as_dataset(np.stack(train), f"photos{p}[train]"), _as_dataset(np.stack(held), f"photos{p}[holdout]")


def pad_images(ds: ImageDataset, size: int, *, value: int = 0) -> ImageDataset:
  """Pads ``[N, H, W, C]`` images symmetrically to ``[N, size, size, C]`` with ``value`` (e.g. MNIST 28 -> 32).

  Args:
      ds: The dataset; ``size - H`` and ``size - W`` must be even and non-negative.
      size: Output side.
      value: Fill value (0 = black, MNIST's background).

  Returns:
      A new dataset with the same labels.
  """
  _, h, w, _ = ds.images.shape
  if size < max(h, w) or (size - h) % 2 or (size - w) % 2:
    raise ValueError(f"cannot pad {h}x{w} images symmetrically to {size}x{size}")
  ph, pw = (size - h) // 2, (size - w) // 2
  images = np.pad(ds.images, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=value)
  return ImageDataset(
    images=images, labels=ds.labels, num_classes=ds.num_classes, name=f"{ds.name}[pad{size}]"
  )
