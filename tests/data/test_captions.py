"""Tests for diffjax.data.captions: digit captions from labels."""

from __future__ import annotations

import re

import numpy as np
import pytest

from diffjax.data.captions import DIGIT_TEMPLATES, DIGIT_WORDS, caption_digit, caption_labels, digit_fields


def _digits_named(caption: str) -> set[int]:
  words = re.findall(r"\w+", caption)
  return {int(w) for w in words if w.isdigit()} | {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}


def test_caption_digit_templates_and_articles():
  assert caption_digit(3) == "a handwritten 3"
  assert [caption_digit(8, template=t) for t in DIGIT_TEMPLATES] == [
    "a handwritten 8",
    "the digit eight",
    "an 8",
    "the number 8",
    "an eight",
    "a handwritten digit eight",
  ]
  assert caption_digit(0, template="{a_word}") == "a zero"
  assert digit_fields(8, prefix="left_") == {
    "left_digit": "8",
    "left_word": "eight",
    "a_left_digit": "an 8",
    "a_left_word": "an eight",
  }


def test_caption_labels_name_the_right_digit_and_are_seeded():
  labels = np.arange(600, dtype=np.int32) % 10
  captions, ids = caption_labels(labels, seed=0)
  assert len(captions) == 600 and ids.dtype == np.int32 and ids.shape == (600,)
  assert set(ids.tolist()) == set(range(len(DIGIT_TEMPLATES)))  # every phrasing is used
  for caption, label, t in zip(captions, labels, ids, strict=True):
    assert _digits_named(caption) == {label}
    assert caption == caption_digit(int(label), template=DIGIT_TEMPLATES[t])
  again, _ = caption_labels(labels, seed=0)
  other, _ = caption_labels(labels, seed=1)
  assert again == captions and other != captions
  one, one_ids = caption_labels(labels, seed=5, templates=["{a_digit}"])
  assert one[:3] == ["a 0", "a 1", "a 2"] and one[8] == "an 8" and not one_ids.any()


@pytest.mark.parametrize(
  ("labels", "match"),
  [
    (np.array([1.0, 2.0]), "int array"),
    (np.zeros((2, 2), np.int32), "int array"),
    (np.array([3, 10]), r"digits 0..9, got range \[3, 10\]"),
    (np.array([-1]), "digits 0..9"),
  ],
)
def test_caption_labels_rejects_bad_labels(labels, match):
  with pytest.raises(ValueError, match=match):
    caption_labels(labels, seed=0)


def test_bad_templates_and_digits():
  with pytest.raises(ValueError, match=r"template 'a {colour} 3' uses an unknown field 'colour'"):
    caption_labels(np.array([3]), seed=0, templates=["a {colour} 3"])
  with pytest.raises(ValueError, match="non-empty list"):
    caption_labels(np.array([3]), seed=0, templates=[])
  with pytest.raises(ValueError, match="non-empty list"):
    caption_labels(np.array([3]), seed=0, templates="{digit}")
  with pytest.raises(ValueError, match="unknown field"):
    caption_digit(3, template="{number}")
  for bad in (10, -1, 2.0, True):
    with pytest.raises(ValueError, match="int in 0..9"):
      caption_digit(bad)
