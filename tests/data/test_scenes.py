"""Tests for diffjax.data.scenes: two-digit captioned scenes, their masks, and judging them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from diffjax.data import ImageDataset, load_digits, load_mnist_idx, to_model_range
from diffjax.data.captions import DIGIT_WORDS
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

ROOT = Path(__file__).resolve().parents[2]
MNIST_DIR = ROOT.parent / "shared/data/mnist"
MNIST_JUDGE = ROOT / "runs/judges/mnist.safetensors"

_DIGIT = r"(?:an?) (\w+)"
_PATTERNS = [
  (re.compile(rf"{_DIGIT} to the left of {_DIGIT}"), False),
  (re.compile(rf"{_DIGIT} to the right of {_DIGIT}"), True),
  (re.compile(rf"{_DIGIT} on the left and {_DIGIT} on the right"), False),
]


def _parse(caption: str) -> tuple[int, int]:
  """``(left, right)`` as a reader of the caption understands it."""
  for pattern, reverse in _PATTERNS:
    m = pattern.fullmatch(caption)
    if m:
      a, b = (int(w) if w.isdigit() else DIGIT_WORDS.index(w) for w in m.groups())
      return (b, a) if reverse else (a, b)
  raise AssertionError(f"unparsed caption {caption!r}")


@pytest.fixture(scope="module")
def digits():
  return load_digits()


@pytest.fixture(scope="module")
def source(digits):
  return digits_as_mnist(digits)


def test_scenes_layout_labels_masks_and_captions(source):
  scenes = make_scenes(source, num_scenes=300, seed=0)
  assert isinstance(scenes, SceneDataset) and len(scenes) == 300
  assert scenes.images.shape == (300, 32, 64, 1) and scenes.images.dtype == np.uint8
  assert scenes.image_shape == (32, 64, 1) and scenes.masks.shape == (300, 32, 64)
  np.testing.assert_array_equal(scenes.labels, source.labels[scenes.source_indices])
  # Masks: 1 only in the left cell, 2 only in the right, exactly where a digit has ink.
  assert not (scenes.masks[:, :, 32:] == 1).any() and not (scenes.masks[:, :, :32] == 2).any()
  np.testing.assert_array_equal(scenes.masks > 0, scenes.images[..., 0] > 0)
  assert (scenes.masks == 1).any(axis=(1, 2)).all() and (scenes.masks == 2).any(axis=(1, 2)).all()
  # Each digit's pixels are the source digit's, moved by at most max_shift=2 from the cell centre.
  for i in range(20):
    for side in (0, 1):
      cell = scenes.images[i, :, 32 * side : 32 * (side + 1), 0]
      digit = source.images[scenes.source_indices[i, side], ..., 0]
      found = [
        (dy, dx)
        for dy in range(-2, 3)
        for dx in range(-2, 3)
        if np.array_equal(cell[2 + dy : 30 + dy, 2 + dx : 30 + dx], digit) and cell.sum() == digit.sum()
      ]
      assert found, f"scene {i} side {side}"
  # Captions say exactly which digit is where, in every phrasing.
  assert set(scenes.template_ids.tolist()) == set(range(len(SCENE_TEMPLATES)))
  for caption, (left, right) in zip(scenes.captions, scenes.labels, strict=True):
    assert _parse(caption) == (left, right), caption


def test_scene_caption_wording():
  assert scene_caption(left=3, right=5) == "a 3 to the left of a 5"
  assert [scene_caption(left=8, right=3, template=t) for t in SCENE_TEMPLATES] == [
    "an 8 to the left of a 3",
    "a 3 to the right of an 8",
    "an eight to the left of a three",
    "a three to the right of an eight",
    "an 8 on the left and a 3 on the right",
  ]
  with pytest.raises(ValueError, match="unknown field"):
    scene_caption(left=1, right=2, template="{left} then {right}")


def test_scenes_are_seeded_and_subsettable(source):
  a = make_scenes(source, num_scenes=50, seed=3)
  b = make_scenes(source, num_scenes=50, seed=3)
  c = make_scenes(source, num_scenes=50, seed=4)
  assert a.fingerprint() == b.fingerprint() != c.fingerprint()
  assert a.captions == b.captions and a.name == "scenes(digits@28, seed=3)"
  part = a.subset(np.array([4, 1]), name="two")
  assert part.name == "two" and part.captions == (a.captions[4], a.captions[1])
  np.testing.assert_array_equal(part.images, a.images[[4, 1]])
  np.testing.assert_array_equal(part.masks, a.masks[[4, 1]])
  np.testing.assert_array_equal(part.source_indices, a.source_indices[[4, 1]])
  fixed = make_scenes(source, num_scenes=50, seed=3, templates=[SCENE_TEMPLATES[0]], max_shift=0)
  assert fixed.fingerprint() != a.fingerprint() and not fixed.template_ids.any()
  distinct = make_scenes(source, num_scenes=200, seed=3, distinct=True)
  assert (distinct.labels[:, 0] != distinct.labels[:, 1]).all()


def test_scene_errors(source, digits):
  with pytest.raises(ValueError, match="do not fit cells of 28"):
    make_scenes(source, num_scenes=2, seed=0, cell_size=28)
  assert make_scenes(source, num_scenes=2, seed=0, cell_size=28, max_shift=0).image_shape == (28, 56, 1)
  with pytest.raises(ValueError, match="num_scenes must be an int >= 1"):
    make_scenes(source, num_scenes=0, seed=0)
  rgb = ImageDataset(
    images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2, np.int32), num_classes=10, name="x"
  )
  with pytest.raises(ValueError, match="1-channel"):
    make_scenes(rgb, num_scenes=2, seed=0)
  many = ImageDataset(
    images=np.zeros((2, 8, 8, 1), np.uint8), labels=np.array([0, 11], np.int32), num_classes=12, name="y"
  )
  with pytest.raises(ValueError, match="digit labels 0..9"):
    make_scenes(many, num_scenes=2, seed=0)
  same = ImageDataset(
    images=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(2, np.int32), num_classes=10, name="z"
  )
  with pytest.raises(ValueError, match="at least two different digits"):
    make_scenes(same, num_scenes=2, seed=0, distinct=True)
  scenes = make_scenes(source, num_scenes=2, seed=0)
  with pytest.raises(ValueError, match=r"labels must be int32 \[2, 2\]"):
    SceneDataset(**{**scenes.__dict__, "labels": scenes.labels[:, 0]})
  with pytest.raises(ValueError, match="captions must be 2 strings"):
    SceneDataset(**{**scenes.__dict__, "captions": ("only one",)})
  with pytest.raises(ValueError, match=r"\[N, H, 2H, 1\]"):
    SceneDataset(**{**scenes.__dict__, "images": scenes.images[:, :, :40]})
  with pytest.raises(ValueError, match="box must be"):
    digits_as_mnist(digits, box=30)


def test_digits_as_mnist_and_exact_halves(digits):
  smooth = digits_as_mnist(digits)
  assert smooth.image_shape == (28, 28, 1) and smooth.name == "digits@28"
  np.testing.assert_array_equal(smooth.labels, digits.labels)
  assert not smooth.images[:, :4].any() and not smooth.images[:, :, 24:].any()  # 20x20 box, 4 px margin
  blocks = digits_as_mnist(digits, box=24, resample="nearest")
  scenes = make_scenes(blocks, num_scenes=40, seed=0, max_shift=0)
  left, right = scene_halves(scenes.images, size=8, crop=24)  # area average undoes the 3x nearest upsampling
  assert left.shape == (40, 8, 8, 1) and left.dtype == np.float32
  np.testing.assert_allclose(left, to_model_range(digits.images[scenes.source_indices[:, 0]]), atol=1e-6)
  np.testing.assert_allclose(right, to_model_range(digits.images[scenes.source_indices[:, 1]]), atol=1e-6)


def test_scene_halves_crop_and_errors():
  images = np.arange(2 * 32 * 64, dtype=np.int64).reshape(2, 32, 64, 1).astype(np.uint8)
  left, right = scene_halves(images, size=28)
  assert left.dtype == np.uint8 and left.shape == (2, 28, 28, 1)
  np.testing.assert_array_equal(left, images[:, 2:30, 2:30])
  np.testing.assert_array_equal(right, images[:, 2:30, 34:62])
  up, _ = scene_halves(images, size=40)  # upsampled linearly from the whole 32x32 cell
  assert up.shape == (2, 40, 40, 1) and up.dtype == np.float32 and np.abs(up).max() <= 1.0
  with pytest.raises(ValueError, match="even W"):
    scene_halves(images[:, :, :63], size=28)
  with pytest.raises(ValueError, match=r"crop=33 must be in \[1, 32\]"):
    scene_halves(images, size=28, crop=33)


def test_score_scenes():
  labels = np.array([[3, 5], [1, 1], [2, 7], [4, 6]])
  predicted = np.array([[3, 5], [1, 1], [7, 2], [4, 0]])
  assert score_scenes(predicted, labels) == {"both": 0.5, "left": 0.75, "right": 0.5, "swapped": 1 / 3}
  assert score_scenes(labels[1:2], labels[1:2])["swapped"] is None
  with pytest.raises(ValueError, match=r"\[N, 2\]"):
    score_scenes(predicted[:, :1], labels[:, :1])


def test_digit_judge_reads_both_digits_in_order(digits):
  """CPU-cheap end-to-end check with a judge trained in seconds on sklearn's digits.

  The scenes are built from the judge's own training digits (3x nearest upsampling, no shift), so this
  checks that composing and cutting scenes keeps each digit readable and in its place; judging
  generalisation is the MNIST test's job.
  """
  from diffjax.eval import train_judge

  params, _ = train_judge(digits, seed=0, steps=150, batch_size=128, learning_rate=3e-3, holdout=None)
  scenes = make_scenes(
    digits_as_mnist(digits, box=24, resample="nearest"), num_scenes=400, seed=1, max_shift=0
  )
  predicted = judge_scenes(params, scenes.images, crop=24)
  assert predicted.shape == (400, 2) and predicted.dtype == np.int32
  score = score_scenes(predicted, scenes.labels)
  assert score["both"] >= 0.95, score
  assert score["swapped"] == 0.0, score


@pytest.mark.skipif(
  not (MNIST_JUDGE.is_file() and (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()),
  reason="needs runs/judges/mnist.safetensors and ../shared/data/mnist",
)
def test_mnist_judge_reads_real_scenes():
  from diffjax.eval import load_judge

  params, _ = load_judge(MNIST_JUDGE)
  scenes = make_scenes(load_mnist_idx(MNIST_DIR), num_scenes=1000, seed=0)
  score = score_scenes(judge_scenes(params, scenes.images), scenes.labels)
  assert score["both"] >= 0.95, score
  assert score["swapped"] <= 0.01, score
