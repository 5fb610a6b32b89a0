"""In-memory image datasets and the loaders that build them.

Every loader returns an :class:`ImageDataset` holding the whole split in host
memory as ``uint8 [N, H, W, C]`` images and ``int32 [N]`` labels. The datasets
used by ``diffjax`` (sklearn digits, MNIST, Fashion-MNIST, CIFAR-10) are small
enough for this, and it keeps batching deterministic and resumable (see
:mod:`diffjax.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_ALLOWED_CHANNELS = (1, 3)
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
SOURCES_HELP = "digits, mnist_idx, tfds:<name>"


def validate_images(images: np.ndarray, *, name: str = "images") -> None:
  """Checks that ``images`` is a non-empty ``uint8 [N, H, W, C]`` array.

  Args:
      images: Array to check; expected ``uint8 [N, H, W, C]`` with C in {1, 3}.
      name: Argument name used in the error message.

  Raises:
      ValueError: If the type, rank, dtype, sizes or channel count are wrong.
  """
  if not isinstance(images, np.ndarray):
    raise ValueError(f"{name} must be a numpy.ndarray, got {type(images).__name__}")
  if images.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [N, H, W, C], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"{name} must have dtype uint8, got {images.dtype}")
  if min(images.shape[:3]) <= 0:
    raise ValueError(f"{name} must have N, H, W > 0, got shape {images.shape}")
  if images.shape[3] not in _ALLOWED_CHANNELS:
    raise ValueError(
      f"{name} must have C in {_ALLOWED_CHANNELS} channels (last axis), got shape {images.shape}"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """A labelled image dataset held in host memory.

  Attributes:
      images: ``uint8 [N, H, W, C]`` pixels in 0..255, C in {1, 3}.
      labels: ``int32 [N]`` class ids in ``[0, num_classes)``.
      num_classes: Number of classes (> 0).
      name: Human-readable identity, e.g. ``"digits"`` or ``"tfds:mnist/train"``.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self) -> None:
    validate_images(self.images, name="images")
    labels = self.labels
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
      raise ValueError(
        "labels must be an int32 numpy array of shape [N], got "
        f"{getattr(labels, 'dtype', type(labels).__name__)} "
        f"{getattr(labels, 'shape', '')}"
      )
    if labels.shape[0] != self.images.shape[0]:
      raise ValueError(
        f"labels must have one entry per image: got {labels.shape[0]} labels "
        f"for {self.images.shape[0]} images"
      )
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
      raise ValueError(f"num_classes must be an int, got {self.num_classes!r}")
    if self.num_classes <= 0:
      raise ValueError(f"num_classes must be > 0, got {self.num_classes}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= self.num_classes:
      raise ValueError(
        f"labels must lie in [0, {self.num_classes}), got range [{lo}, {hi}] in dataset {self.name!r}"
      )

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

  def fingerprint(self) -> str:
    """SHA-256 hex digest of ``images.tobytes() + labels.tobytes()`` (C order).

    Returns:
        64-character lowercase hex string; identical data gives identical
        fingerprints across processes and machines.
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(self.images).tobytes())
    digest.update(np.ascontiguousarray(self.labels).tobytes())
    return digest.hexdigest()

  def subset(self, indices: np.ndarray, *, name: str | None = None) -> ImageDataset:
    """Returns a new dataset with the examples at ``indices`` (int ``[M]``)."""
    idx = np.asarray(indices)
    return ImageDataset(
      images=self.images[idx],
      labels=self.labels[idx],
      num_classes=self.num_classes,
      name=self.name if name is None else name,
    )


def load_digits() -> ImageDataset:
  """Loads sklearn's 8x8 handwritten digits (bundled with sklearn, no download).

  Pixel values 0..16 are mapped to ``uint8`` via ``round(v * 255 / 16)``.

  Returns:
      ImageDataset with images ``uint8 [1797, 8, 8, 1]`` and 10 classes.
  """
  from sklearn import datasets as sk_datasets  # Local: sklearn import is slow.

  bunch = sk_datasets.load_digits()
  pixels = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8] in 0..16
  images = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  labels = np.asarray(bunch.target, dtype=np.int32)
  return ImageDataset(images=images, labels=labels, num_classes=10, name="digits")


def _find_idx_file(directory: Path, stem: str, what: str) -> Path:
  for candidate in (directory / stem, directory / f"{stem}.gz"):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"MNIST IDX {what} not found in '{directory}': expected {stem} or {stem}.gz")


def _read_maybe_gzip(path: Path) -> bytes:
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError.
    raise ValueError(f"could not read IDX file '{path}': {err}") from err


def _parse_idx(data: bytes, *, path: Path, magic: int, num_dims: int) -> tuple[int, ...]:
  """Validates an IDX header; returns the dims (count first)."""
  header_len = 4 + 4 * num_dims
  if len(data) < header_len:
    raise ValueError(
      f"IDX file '{path}' is truncated: expected a {header_len}-byte header, got {len(data)} bytes"
    )
  found = int.from_bytes(data[0:4], "big")
  if found != magic:
    raise ValueError(f"IDX file '{path}' has magic number {found}, expected {magic}")
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
  expected = header_len + int(np.prod(dims, dtype=np.int64))
  if len(data) != expected:
    raise ValueError(
      f"IDX file '{path}' has {len(data)} bytes, expected {expected} "
      f"(header {header_len} + dims {' x '.join(map(str, dims))})"
    )
  return dims


def load_mnist_idx(path: str | os.PathLike, *, split: str = "test") -> ImageDataset:
  """Loads MNIST from the original IDX files (raw or gzipped).

  Args:
      path: Directory holding ``{prefix}-images-idx3-ubyte[.gz]`` and
          ``{prefix}-labels-idx1-ubyte[.gz]``, where prefix is ``train`` or ``t10k``.
      split: ``"train"`` (``train-*`` files) or ``"test"`` (``t10k-*`` files).

  Returns:
      ImageDataset with images ``uint8 [N, rows, cols, 1]`` (28x28 for MNIST)
      and ``int32 [N]`` labels, 10 classes.

  Raises:
      ValueError: Unknown split, bad magic number, truncated/oversized file,
          image/label count mismatch, or labels outside 0..9.
      FileNotFoundError: If ``path`` or one of the files is missing.
  """
  if split not in _MNIST_PREFIX:
    raise ValueError(f"split={split!r} is not one of: {', '.join(_MNIST_PREFIX)}")
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"MNIST IDX directory '{directory}' does not exist")
  prefix = _MNIST_PREFIX[split]
  images_path = _find_idx_file(directory, f"{prefix}-images-idx3-ubyte", "images")
  labels_path = _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte", "labels")

  image_bytes = _read_maybe_gzip(images_path)
  count, rows, cols = _parse_idx(image_bytes, path=images_path, magic=_IDX_IMAGES_MAGIC, num_dims=3)
  label_bytes = _read_maybe_gzip(labels_path)
  (label_count,) = _parse_idx(label_bytes, path=labels_path, magic=_IDX_LABELS_MAGIC, num_dims=1)
  if count != label_count:
    raise ValueError(
      f"MNIST IDX count mismatch in '{directory}': {count} images in "
      f"'{images_path.name}' but {label_count} labels in '{labels_path.name}'"
    )
  if count == 0:
    raise ValueError(f"MNIST IDX file '{images_path}' holds no images")
  images = np.frombuffer(image_bytes, dtype=np.uint8, offset=16).reshape(count, rows, cols, 1)
  labels = np.frombuffer(label_bytes, dtype=np.uint8, offset=8).astype(np.int32)
  if int(labels.max()) > 9:
    raise ValueError(f"IDX labels in '{labels_path}' must be 0..9, got max {labels.max()}")
  return ImageDataset(images=images.copy(), labels=labels, num_classes=10, name=f"mnist_idx/{split}")


def load_tfds(
  name: str,
  *,
  split: str = "train",
  data_dir: str | None = None,
  download: bool = False,
) -> ImageDataset:
  """Loads an image classification dataset via ``tfds.data_source`` (no TensorFlow).

  The data must already be prepared in ``array_record`` format under ``data_dir``
  unless ``download=True``. Records must have ``'image'`` (``uint8 [H, W, C]`` or
  ``[H, W]``) and ``'label'`` (int) keys, e.g. mnist, fashion_mnist, cifar10.

  Args:
      name: TFDS dataset name, e.g. ``"cifar10"``.
      split: TFDS split spec, e.g. ``"train"`` or ``"test[:10%]"``.
      data_dir: TFDS data directory; ``None`` uses the TFDS default.
      download: Let TFDS download and prepare the data if missing.

  Returns:
      ImageDataset with images ``uint8 [N, H, W, C]`` and ``int32 [N]`` labels.

  Raises:
      ValueError: Unknown dataset name, empty split, or records without the
          expected keys.
      RuntimeError: If TFDS cannot open the split (e.g. not prepared).
  """
  import tensorflow_datasets as tfds  # Local: heavy import.

  where = f"tfds dataset {name!r} split={split!r} data_dir={data_dir!r}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise ValueError(f"tfds dataset name={name!r} is not registered in TFDS") from err
  except Exception as err:  # TFDS raises many types; keep the message to one line.
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    raise RuntimeError(f"could not open {where} (download={download}): {first_line}") from err

  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"{where} is empty")
  logger.info("Reading %d records from %s", num_records, where)
  images, labels = None, np.empty((num_records,), dtype=np.int32)
  for i in range(num_records):
    record = source[i]
    if "image" not in record or "label" not in record:
      raise ValueError(f"{where}: records must have 'image' and 'label' keys, got {sorted(record)}")
    image = np.asarray(record["image"], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if images is None:
      images = np.empty((num_records, *image.shape), dtype=np.uint8)
    elif image.shape != images.shape[1:]:
      raise ValueError(f"{where}: record {i} has image shape {image.shape}, expected {images.shape[1:]}")
    images[i] = image
    labels[i] = int(record["label"])
    if (i + 1) % 10000 == 0:
      logger.info("  read %d/%d records", i + 1, num_records)

  num_classes = 10
  label_feature = builder.info.features["label"] if "label" in builder.info.features else None
  if getattr(label_feature, "num_classes", None):
    num_classes = int(label_feature.num_classes)
  return ImageDataset(images=images, labels=labels, num_classes=num_classes, name=f"tfds:{name}/{split}")


def load_dataset(
  *,
  source: str,
  path: str | None = None,
  split: str = "train",
  data_dir: str | None = None,
) -> ImageDataset:
  """Loads a dataset by source string.

  Args:
      source: ``"digits"``, ``"mnist_idx"`` or ``"tfds:<name>"``.
      path: IDX directory for ``mnist_idx``; defaults to ``$DIFFJAX_MNIST_DIR``.
      split: Split name (``"train"``/``"test"`` for mnist_idx, any TFDS split
          spec for tfds, ignored for digits which has a single split).
      data_dir: TFDS data directory (tfds only).

  Returns:
      The loaded ImageDataset.

  Raises:
      ValueError: If ``source`` is unknown or ``path`` is missing for mnist_idx.
  """
  if source == "digits":
    return load_digits()
  if source == "mnist_idx":
    path = path or os.environ.get("DIFFJAX_MNIST_DIR")
    if not path:
      raise ValueError("path is required for source='mnist_idx' (or set DIFFJAX_MNIST_DIR)")
    return load_mnist_idx(path, split=split)
  if isinstance(source, str) and source.startswith("tfds:") and len(source) > len("tfds:"):
    return load_tfds(source[len("tfds:") :], split=split, data_dir=data_dir)
  raise ValueError(f"source={source!r} is not one of: {SOURCES_HELP}")


def split_holdout(ds: ImageDataset, *, holdout: int | float, seed: int) -> tuple[ImageDataset, ImageDataset]:
  """Deterministically splits off a held-out subset.

  Args:
      ds: Dataset with N examples.
      holdout: Number of held-out examples (int in ``[1, N-1]``) or a fraction
          (float in ``(0, 1)``, rounded to the nearest count, at least 1).
      seed: Seed for ``np.random.default_rng``; same seed, same split.

  Returns:
      ``(train, heldout)`` datasets with N-K and K examples; each keeps the
      original example order, and together they partition ``ds``.

  Raises:
      ValueError: If ``holdout`` is out of range or of the wrong type.
  """
  n = len(ds)
  if isinstance(holdout, bool) or not isinstance(holdout, int | float | np.integer | np.floating):
    raise ValueError(f"holdout must be an int count or float fraction, got {holdout!r}")
  if isinstance(holdout, float | np.floating):
    if not 0.0 < holdout < 1.0:
      raise ValueError(f"holdout fraction must be in (0, 1), got {holdout}")
    count = max(1, int(round(holdout * n)))
  else:
    count = int(holdout)
  if not 0 < count < n:
    raise ValueError(f"holdout must leave both parts non-empty: got {count} of {n} examples")
  perm = np.random.default_rng(seed).permutation(n)
  held_idx = np.sort(perm[:count])
  train_idx = np.sort(perm[count:])
  return (
    ds.subset(train_idx, name=f"{ds.name}[train]"),
    ds.subset(held_idx, name=f"{ds.name}[holdout]"),
  )
