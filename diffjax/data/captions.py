"""Captions for digit images, from their labels.

A text-to-image model trained on labelled digits needs prompts, not class ids. Each image gets one
caption drawn from a few templates (``"a handwritten 3"``, ``"the digit three"``, ``"an 8"``, ...), so
the text encoder has to map several phrasings to the same digit. The template of example ``i`` is drawn
from ``np.random.default_rng(seed)``: the same labels and seed give the same captions everywhere.

Template fields: ``{digit}`` (``"3"``), ``{word}`` (``"three"``), and the same with an article,
``{a_digit}`` (``"a 3"``, ``"an 8"``) and ``{a_word}`` (``"a three"``, ``"an eight"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
  "DIGIT_TEMPLATES",
  "DIGIT_WORDS",
  "caption_digit",
  "caption_labels",
  "check_templates",
  "digit_fields",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
  "a handwritten {digit}",
  "the digit {word}",
  "{a_digit}",
  "the number {digit}",
  "{a_word}",
  "a handwritten digit {word}",
)
_VOWEL_SOUND = (8,)  # "an 8", "an eight"; every other digit takes "a".


def _check_digit(label: int) -> int:
  if isinstance(label, bool) or not isinstance(label, int | np.integer) or not 0 <= label <= 9:
    raise ValueError(f"a digit label must be an int in 0..9, got {label!r}")
  return int(label)


def digit_fields(label: int, *, prefix: str = "") -> dict[str, str]:
  """The template fields of one digit.

  Args:
      label: Digit 0..9.
      prefix: Prepended to each field name, e.g. ``"left_"`` gives ``{left_digit}``, ``{a_left_word}``.

  Returns:
      ``{digit, word, a_digit, a_word}`` (with ``prefix``), e.g. for 8: ``"8"``, ``"eight"``,
      ``"an 8"``, ``"an eight"``.

  Raises:
      ValueError: If ``label`` is not an int in 0..9.
  """
  label = _check_digit(label)
  article = "an" if label in _VOWEL_SOUND else "a"
  digit, word = str(label), DIGIT_WORDS[label]
  return {
    f"{prefix}digit": digit,
    f"{prefix}word": word,
    f"a_{prefix}digit": f"{article} {digit}",
    f"a_{prefix}word": f"{article} {word}",
  }


def caption_digit(label: int, *, template: str = DIGIT_TEMPLATES[0]) -> str:
  """The caption of one digit, e.g. ``caption_digit(3) == "a handwritten 3"``.

  Args:
      label: Digit 0..9.
      template: A format string with the fields of :func:`digit_fields`.

  Returns:
      The caption.

  Raises:
      ValueError: If ``label`` is out of range or ``template`` uses an unknown field.
  """
  try:
    return template.format(**digit_fields(label))
  except (KeyError, IndexError) as err:
    raise ValueError(
      f"template {template!r} uses an unknown field {err}; known: {sorted(digit_fields(0))}"
    ) from None


def check_templates(templates: Sequence[str], fields: dict[str, str]) -> tuple[str, ...]:
  """Checks that ``templates`` is a non-empty list of format strings using only ``fields``.

  Returns:
      The templates as a tuple.

  Raises:
      ValueError: If the list is empty or a bare string, or a template names an unknown field.
  """
  if isinstance(templates, str) or len(templates) == 0:
    raise ValueError(f"templates must be a non-empty list of format strings, got {templates!r}")
  for t in templates:
    try:
      t.format(**fields)
    except (KeyError, IndexError, AttributeError) as err:
      raise ValueError(f"template {t!r} uses an unknown field {err}; known: {sorted(fields)}") from None
  return tuple(templates)


def caption_labels(
  labels: np.ndarray, *, seed: int, templates: Sequence[str] = DIGIT_TEMPLATES
) -> tuple[list[str], np.ndarray]:
  """Captions a labelled digit dataset, one template drawn per example.

  Args:
      labels: ``int [N]`` digits 0..9 (e.g. ``ImageDataset.labels``).
      seed: Seed of the template draw.
      templates: Format strings with the fields of :func:`digit_fields`.

  Returns:
      ``(captions, template_ids)``: ``N`` strings and ``int32 [N]`` indices into ``templates``.

  Raises:
      ValueError: If ``labels`` is not a 1-D array of digits or a template is invalid.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be an int array [N], got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise ValueError(f"labels must be digits 0..9, got range [{labels.min()}, {labels.max()}]")
  templates = check_templates(templates, digit_fields(0))
  ids = np.random.default_rng(seed).integers(0, len(templates), size=labels.shape[0]).astype(np.int32)
  captions = [templates[t].format(**digit_fields(int(y))) for y, t in zip(labels, ids, strict=True)]
  return captions, ids
