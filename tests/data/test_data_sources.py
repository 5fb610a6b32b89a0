"""Tests for diffjax.data.sources: loaders, validation, fingerprints, holdout."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from diffjax.data import (
  ImageDataset,
  load_dataset,
  load_digits,
  load_mnist_idx,
  load_tfds,
  split_holdout,
  validate_images,
)

MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _mnist_dir() -> Path | None:
  candidates = []
  if os.environ.get("DIFFJAX_MNIST_DIR"):
    candidates.append(Path(os.environ["DIFFJAX_MNIST_DIR"]))
  candidates.append(Path(__file__).resolve().parents[2].parent / "shared/data/mnist")
  for c in candidates:
    if any((c / f"t10k-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
      return c
  return None


def _write_idx(
  directory: Path,
  *,
  prefix: str = "t10k",
  images: np.ndarray,
  labels: np.ndarray,
  gz: bool,
  image_magic: int = 2051,
  label_magic: int = 2049,
  label_count: int | None = None,
  trailing: bytes = b"",
) -> None:
  n, rows, cols = images.shape
  img = struct.pack(">IIII", image_magic, n, rows, cols) + images.astype(np.uint8).tobytes()
  lab = struct.pack(">II", label_magic, len(labels) if label_count is None else label_count)
  lab += labels.astype(np.uint8).tobytes()
  files = {
    f"{prefix}-images-idx3-ubyte": img + trailing,
    f"{prefix}-labels-idx1-ubyte": lab,
  }
  for fname, data in files.items():
    if gz:
      with gzip.open(directory / f"{fname}.gz", "wb") as f:
        f.write(data)
    else:
      (directory / fname).write_bytes(data)


@pytest.fixture
def small_idx():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(12, 5, 4), dtype=np.uint8)
  labels = np.arange(12) % 10
  return images, labels


# ---------------------------------------------------------------- digits


def test_load_digits():
  ds = load_digits()
  assert ds.images.shape == (1797, 8, 8, 1)
  assert ds.images.dtype == np.uint8
  assert ds.labels.shape == (1797,) and ds.labels.dtype == np.int32
  assert ds.num_classes == 10 and len(ds) == 1797
  assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
  assert set(np.unique(ds.labels).tolist()) == set(range(10))
  # round(v * 255 / 16) for v in 0..16: only these 17 values can occur.
  allowed = {round(v * 255 / 16) for v in range(17)}
  assert set(np.unique(ds.images).tolist()) <= allowed
  assert ds.name == "digits"
  assert load_dataset(source="digits").fingerprint() == ds.fingerprint()


def test_fingerprint_is_sha256_of_bytes_and_sensitive():
  ds = load_digits()
  expected = hashlib.sha256(ds.images.tobytes() + ds.labels.tobytes()).hexdigest()
  assert ds.fingerprint() == expected
  changed = ds.labels.copy()
  changed[0] = (changed[0] + 1) % 10
  other = ImageDataset(images=ds.images, labels=changed, num_classes=10, name="x")
  assert other.fingerprint() != ds.fingerprint()


# ---------------------------------------------------------------- MNIST IDX


def test_real_mnist_test_split():
  directory = _mnist_dir()
  if directory is None:
    pytest.skip("MNIST t10k IDX files not found (set DIFFJAX_MNIST_DIR)")
  ds = load_mnist_idx(str(directory), split="test")
  assert ds.images.shape == (10000, 28, 28, 1)
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  assert np.bincount(ds.labels, minlength=10).tolist() == MNIST_TEST_CLASS_COUNTS
  assert ds.images.mean() == pytest.approx(33.79, abs=0.01)
  assert ds.num_classes == 10
  via_dispatch = load_dataset(source="mnist_idx", path=str(directory), split="test")
  assert via_dispatch.fingerprint() == ds.fingerprint()


@pytest.mark.parametrize("gz", [False, True])
def test_small_idx_roundtrip(tmp_path, small_idx, gz):
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels, gz=gz)
  ds = load_mnist_idx(tmp_path, split="test")
  assert ds.images.shape == (12, 5, 4, 1)
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.labels.dtype == np.int32


def test_idx_train_split_and_env_var(tmp_path, small_idx, monkeypatch):
  images, labels = small_idx
  _write_idx(tmp_path, prefix="train", images=images, labels=labels, gz=True)
  assert len(load_mnist_idx(tmp_path, split="train")) == 12
  expected = "expected t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"
  with pytest.raises(FileNotFoundError, match=expected):
    load_mnist_idx(tmp_path, split="test")
  monkeypatch.setenv("DIFFJAX_MNIST_DIR", str(tmp_path))
  assert len(load_dataset(source="mnist_idx", split="train")) == 12
  monkeypatch.delenv("DIFFJAX_MNIST_DIR")
  with pytest.raises(ValueError, match="path is required"):
    load_dataset(source="mnist_idx")


def test_idx_missing_files(tmp_path, small_idx):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_mnist_idx(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"MNIST IDX images not found in '.*'"):
    load_mnist_idx(tmp_path)
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels, gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    load_mnist_idx(tmp_path)
  with pytest.raises(ValueError, match="split='valid'"):
    load_mnist_idx(tmp_path, split="valid")


@pytest.mark.parametrize(
  "kwargs, pattern",
  [
    (dict(image_magic=2049), "magic number 2049, expected 2051"),
    (dict(label_magic=2051), "magic number 2051, expected 2049"),
    (dict(trailing=b"\x00"), "has 257 bytes, expected 256"),
  ],
)
def test_idx_corrupt_headers(tmp_path, small_idx, kwargs, pattern):
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels, gz=True, **kwargs)
  with pytest.raises(ValueError, match=pattern):
    load_mnist_idx(tmp_path)


def test_idx_count_mismatch_and_truncation(tmp_path, small_idx):
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels[:10], gz=False)
  with pytest.raises(ValueError, match="12 images .* but 10 labels"):
    load_mnist_idx(tmp_path)
  # Header claims 12 labels but only 10 follow.
  _write_idx(tmp_path, images=images, labels=labels[:10], gz=False, label_count=12)
  with pytest.raises(ValueError, match="has 18 bytes, expected 20"):
    load_mnist_idx(tmp_path)
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
  with pytest.raises(ValueError, match="truncated"):
    load_mnist_idx(tmp_path)


def test_idx_labels_out_of_range(tmp_path, small_idx):
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels + 5, gz=False)
  with pytest.raises(ValueError, match="must be 0..9"):
    load_mnist_idx(tmp_path)


def test_idx_bad_gzip(tmp_path, small_idx):
  images, labels = small_idx
  _write_idx(tmp_path, images=images, labels=labels, gz=True)
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="could not read IDX file"):
    load_mnist_idx(tmp_path)


# ---------------------------------------------------------------- TFDS (mocked)


@pytest.mark.parametrize(
  "name, shape",
  [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)), ("fashion_mnist", (28, 28, 1))],
)
def test_load_tfds_mocked(tmp_path, name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    ds = load_tfds(name, split="train", data_dir=str(tmp_path))
    again = load_dataset(source=f"tfds:{name}", split="train", data_dir=str(tmp_path))
  assert ds.images.shape == (6, *shape) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (6,) and ds.labels.dtype == np.int32
  assert ds.num_classes == 10
  assert ds.labels.min() >= 0 and ds.labels.max() < 10
  assert ds.name == f"tfds:{name}/train"
  assert again.fingerprint() == ds.fingerprint()  # Mock data is deterministic.
  if importlib.util.find_spec("tensorflow") is None:
    assert sys.modules.get("tensorflow") is None


def test_load_tfds_errors(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="name='no_such_dataset_xyz'"):
    load_tfds("no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(RuntimeError, match="could not open tfds dataset 'mnist'"):
    load_tfds("mnist", data_dir=str(tmp_path))  # Not prepared, download=False.


# ---------------------------------------------------------------- validation


def test_unknown_source():
  expected = "source='foo' is not one of: digits, mnist_idx, tfds:<name>"
  with pytest.raises(ValueError, match=re.escape(expected)):
    load_dataset(source="foo")
  with pytest.raises(ValueError, match="source='tfds:'"):
    load_dataset(source="tfds:")


def test_validate_images():
  validate_images(np.zeros((2, 4, 4, 3), np.uint8))
  expected = "images must have rank 4 [N, H, W, C], got shape (10, 28, 28)"
  with pytest.raises(ValueError, match=re.escape(expected)):
    validate_images(np.zeros((10, 28, 28), np.uint8))
  with pytest.raises(ValueError, match="batch must have dtype uint8, got float32"):
    validate_images(np.zeros((2, 4, 4, 1), np.float32), name="batch")
  with pytest.raises(ValueError, match="C in"):
    validate_images(np.zeros((2, 4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match="N, H, W > 0"):
    validate_images(np.zeros((0, 4, 4, 1), np.uint8))
  with pytest.raises(ValueError, match="numpy.ndarray"):
    validate_images([[1]])


def test_image_dataset_validation():
  images = np.zeros((3, 2, 2, 1), np.uint8)
  with pytest.raises(ValueError, match="labels must be an int32"):
    ImageDataset(images=images, labels=np.zeros(3, np.int64), num_classes=2, name="t")
  with pytest.raises(ValueError, match="one entry per image"):
    ImageDataset(images=images, labels=np.zeros(2, np.int32), num_classes=2, name="t")
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    ImageDataset(images=images, labels=np.array([0, 1, 2], np.int32), num_classes=2, name="t")
  with pytest.raises(ValueError, match="images must have rank 4"):
    ImageDataset(images=images[..., 0], labels=np.zeros(3, np.int32), num_classes=2, name="t")


# ---------------------------------------------------------------- holdout


def test_split_holdout():
  ds = load_digits()
  train, held = split_holdout(ds, holdout=100, seed=3)
  assert len(train) == 1697 and len(held) == 100
  train2, held2 = split_holdout(ds, holdout=100, seed=3)
  assert held.fingerprint() == held2.fingerprint() and train.fingerprint() == train2.fingerprint()
  _, held3 = split_holdout(ds, holdout=100, seed=4)
  assert held3.fingerprint() != held.fingerprint()

  # Partition: the multiset of (image bytes, label) rows is preserved.
  def rows(d):
    return sorted(d.images[i].tobytes() + bytes([d.labels[i]]) for i in range(len(d)))

  assert sorted(rows(train) + rows(held)) == rows(ds)
  _, frac = split_holdout(ds, holdout=0.1, seed=0)
  assert len(frac) == round(0.1 * 1797)
  for bad in (0, 1797, 1.0, 0.0, True, "5"):
    with pytest.raises(ValueError, match="holdout"):
      split_holdout(ds, holdout=bad, seed=0)
