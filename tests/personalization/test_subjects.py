"""Digit subjects: augmentations, distinctive instances, scenes, identifier captions, word positions."""

import numpy as np
import pytest

from diffjax.data import SCENE_TEMPLATES
from diffjax.models.text_encoder import minilm_dir
from diffjax.models.text_tokenizer import PromptTokenizer
from diffjax.personalization import subjects as S


@pytest.fixture(scope="module")
def tokenizer():
  return PromptTokenizer.from_file(minilm_dir() / "tokenizer.json")


def _bar() -> np.ndarray:
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 10:18, 14, 0] = 255  # a vertical bar: rows 10..17 of column 14
  return image


def test_affine_rotates_and_shifts_exactly():
  turned = S._affine(_bar()[0, ..., 0], angle=90.0, scale=1.0, shift=(0.0, 0.0))
  rows, cols = np.nonzero(turned > 127)
  assert set(rows) == {12} and cols.tolist() == list(range(10, 18))  # horizontal after a quarter turn
  moved = S._affine(_bar()[0, ..., 0], angle=0.0, scale=1.0, shift=(3.0, -2.0))
  rows, cols = np.nonzero(moved)
  assert (rows.min(), rows.max(), set(cols)) == (13, 20, {12})


def test_augment_digits_is_deterministic_and_keeps_the_first():
  images = np.repeat(_bar(), 4, axis=0)
  a = S.augment_digits(images, seed=3, keep_first=True)
  b = S.augment_digits(images, seed=3, keep_first=True)
  c = S.augment_digits(images, seed=4, keep_first=True)
  assert a.dtype == np.uint8 and a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[0], images[0])
  assert not np.array_equal(a[1:], c[1:]) and not np.array_equal(a[1], images[1])
  same = S.augment_digits(images, seed=3, max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0)
  np.testing.assert_array_equal(same, images)


@pytest.mark.parametrize(
  "kwargs, match",
  [({"scale_range": (1.2, 1.0)}, "scale_range"), ({"max_shift": -1.0}, "max_shift")],
)
def test_augment_digits_rejects_bad_ranges(kwargs, match):
  with pytest.raises(ValueError, match=match):
    S.augment_digits(_bar(), seed=0, **kwargs)


def test_distinctive_digit_ranks_by_distance_to_the_class_mean():
  rng = np.random.default_rng(0)
  images = np.zeros((6, 4, 4, 1), np.uint8)
  images[:5] = 100
  images[4, 0, 0, 0] = 255  # the odd one of class 1
  images[5] = rng.integers(0, 255, (4, 4, 1))
  labels = np.array([1, 1, 1, 1, 1, 2])
  assert S.distinctive_digit(images, labels, label=1, quantile=1.0) == 4
  assert labels[S.distinctive_digit(images, labels, label=1, quantile=0.0)] == 1
  assert S.distinctive_digit(images, labels, label=2) == 5
  with pytest.raises(ValueError, match="no image has label 7"):
    S.distinctive_digit(images, labels, label=7)


def test_compose_scenes_centres_digits_and_masks_them():
  left, right = _bar(), np.full((1, 28, 28, 1), 0, np.uint8)
  right[0, 0, 0, 0] = 9
  scenes, masks = S.compose_scenes(left, right, cell_size=32)
  assert scenes.shape == (1, 32, 64, 1) and masks.shape == (1, 32, 64)
  np.testing.assert_array_equal(scenes[0, 2:30, 2:30], left[0])
  assert scenes[0, 2, 34, 0] == 9 and masks[0, 2, 34] == 2
  assert np.count_nonzero(masks == 1) == 8 and np.count_nonzero(masks == 2) == 1
  with pytest.raises(ValueError, match="do not fit"):
    S.compose_scenes(left, left, cell_size=16)


def test_subject_captions_put_the_identifier_before_the_subject():
  assert (
    S.subject_caption(subject=4, other=7, subject_side=0, identifier="bwv") == "a bwv 4 to the left of a 7"
  )
  assert (
    S.subject_caption(subject=8, other=3, subject_side=1, identifier="bwv", template=SCENE_TEMPLATES[3])
    == "a bwv eight to the right of a three"
  )
  assert S.subject_caption(subject=8, other=3, subject_side=1, identifier=None) == "a 3 to the left of an 8"
  assert S.subject_fields(left=1, right=2, subject_side=0, identifier="ohm")["a_left_digit"] == "an ohm 1"
  with pytest.raises(ValueError, match="identifier must be one alphanumeric word"):
    S.subject_caption(subject=1, other=2, subject_side=0, identifier="two words")
  with pytest.raises(ValueError, match="subject_side"):
    S.subject_caption(subject=1, other=2, subject_side=2, identifier="bwv")


def test_left_named_first_follows_the_templates():
  assert [S.left_named_first(t) for t in SCENE_TEMPLATES] == [True, False, True, False, True]


def test_digit_word_positions_index_the_encoder_rows(tokenizer):
  prompts = [
    "a bwv 4 to the left of a 7",
    "an eight to the right of an eight",
    "a 3 on the left and a 5 on the right",
  ]
  pos = S.digit_word_positions(tokenizer, prompts)
  assert pos.dtype == np.int32 and pos.tolist() == [[3, 9], [2, 8], [2, 8]]
  tokens = tokenizer.tokenize(prompts[0])
  assert [tokens[p] for p in pos[0]] == ["4", "7"] and tokens[2] == S.DEFAULT_IDENTIFIER  # one piece
  with pytest.raises(ValueError, match="has 1 digit words"):
    S.digit_word_positions(tokenizer, ["a 3"])
