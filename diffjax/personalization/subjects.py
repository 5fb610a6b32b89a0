"""Subjects on digit scenes: one writer's digit, its "photographs", its scenes and its prompts.

DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") personalises a text-to-image model with 3-5 photographs of one subject, and FastComposer
(Xiao et al. 2023) conditions on one reference image per subject. On MNIST a *subject* is one particular
handwritten digit, say one writer's "4" with its own slant and strokes:

* :func:`distinctive_digit` picks an atypical instance of a class (far from the class's mean image), so
  that "this 4" differs visibly from "a 4";
* :func:`augment_digits` makes the few photographs of it: small random rotations, scalings and shifts, as
  different shots of one object (the stroke shapes stay the writer's);
* :func:`compose_scenes` places digits in two-digit scenes (with masks), because the base model only
  ever saw scenes of two digits, so the subject appears in one cell and another digit in the other;
* :func:`subject_caption` writes a scene caption with a rare identifier before the subject's class word,
  DreamBooth's "a [V] [class noun]": ``"a bwv 4 to the left of a 7"``;
* :func:`digit_word_positions` finds the token of each digit word in a prompt, the tokens FastComposer
  augments with the subjects' image embeddings (in the order the words appear).

Everything here is host-side NumPy, deterministic in its ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffjax.data.captions import DIGIT_WORDS
from diffjax.data.scenes import SCENE_TEMPLATES, scene_fields
from diffjax.data.sources import validate_images

__all__ = [
  "DEFAULT_IDENTIFIER",
  "augment_digits",
  "compose_scenes",
  "digit_word_positions",
  "distinctive_digit",
  "left_named_first",
  "subject_caption",
  "subject_fields",
]

# A single WordPiece of the MiniLM vocabulary (id 23860) that is rare in English text, as DreamBooth
# picks rare tokens so that the identifier carries little prior meaning. ("sks", DreamBooth's usual
# choice for CLIP, is two pieces here: "sk", "##s".)
DEFAULT_IDENTIFIER = "bwv"
_DIGIT_TOKENS = {**{str(d): d for d in range(10)}, **{w: d for d, w in enumerate(DIGIT_WORDS)}}


def distinctive_digit(images: np.ndarray, labels: np.ndarray, *, label: int, quantile: float = 0.9) -> int:
  """Index of a distinctive instance of one digit class: far from the class's mean image.

  The instances of ``label`` are ranked by the Euclidean distance of their pixels (in ``[0, 1]``) to the
  class mean; the one at ``quantile`` of that ranking is returned (1.0: the most atypical, which is
  often a malformed digit; 0.9 keeps it recognisable).

  Args:
      images: ``uint8 [N, h, w, 1]`` digits.
      labels: ``int [N]`` their classes.
      label: The class to pick from.
      quantile: Rank in ``[0, 1]`` among the class's instances, by distance to the mean.

  Returns:
      An index into ``images``.

  Raises:
      ValueError: If no image has ``label`` or ``quantile`` is outside ``[0, 1]``.
  """
  validate_images(images, name="images")
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"labels must be [N]={images.shape[0]}, got shape {labels.shape}")
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
  (idx,) = np.nonzero(labels == label)
  if idx.size == 0:
    raise ValueError(f"no image has label {label}")
  x = images[idx].reshape(idx.size, -1).astype(np.float32) / 255.0
  dist = np.linalg.norm(x - x.mean(axis=0, keepdims=True), axis=1)
  order = np.argsort(dist, kind="stable")
  return int(idx[order[round(quantile * (idx.size - 1))]])


def _affine(image: np.ndarray, *, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
  """Rotates (degrees, counter-clockwise) and scales ``[h, w]`` about its centre, then shifts (dy, dx)."""
  h, w = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
  # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f): the inverse of
  # p_out = scale * R (p_in - centre) + centre + shift.
  a, b, d, e = cos / scale, -sin / scale, sin / scale, cos / scale
  ox, oy = cx + shift[1], cy + shift[0]
  c, f = cx - a * ox - b * oy, cy - d * ox - e * oy
  out = Image.fromarray(image).transform(
    (w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
  )
  return np.asarray(out)


def augment_digits(
  images: np.ndarray,
  *,
  seed: int,
  max_rotation: float = 10.0,
  scale_range: Sequence[float] = (0.9, 1.1),
  max_shift: float = 2.0,
  keep_first: bool = False,
) -> np.ndarray:
  """Random small rotations, scalings and shifts of digits (new "photographs" of the same strokes).

  Args:
      images: ``uint8 [N, h, w, 1]`` digits on a black background.
      seed: Seed of every draw.
      max_rotation: Rotation angles are uniform in ``[-max_rotation, max_rotation]`` degrees.
      scale_range: ``(low, high)`` of the uniform scale factor.
      max_shift: Shifts are uniform in ``[-max_shift, max_shift]`` pixels per axis.
      keep_first: Return ``images[0]`` unchanged (the original shot among its augmentations).

  Returns:
      ``uint8 [N, h, w, 1]``.

  Raises:
      ValueError: If ``images`` is not single-channel uint8 or the ranges are invalid.
  """
  validate_images(images, name="images")
  if images.shape[3] != 1:
    raise ValueError(f"augment_digits needs 1-channel images, got shape {images.shape}")
  lo, hi = (float(s) for s in scale_range)
  if not 0.0 < lo <= hi:
    raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
  if max_rotation < 0 or max_shift < 0:
    raise ValueError(f"max_rotation and max_shift must be >= 0, got {max_rotation} and {max_shift}")
  rng = np.random.default_rng(seed)
  n = images.shape[0]
  angles = rng.uniform(-max_rotation, max_rotation, n)
  scales = rng.uniform(lo, hi, n)
  shifts = rng.uniform(-max_shift, max_shift, (n, 2))
  out = np.empty_like(images)
  for i in range(n):
    if keep_first and i == 0:
      out[i] = images[i]
      continue
    out[i, ..., 0] = _affine(images[i, ..., 0], angle=angles[i], scale=scales[i], shift=tuple(shifts[i]))
  return out


def compose_scenes(
  left: np.ndarray, right: np.ndarray, *, cell_size: int, ink_threshold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Two-digit scenes as :func:`diffjax.data.make_scenes` draws them, from given digits (centred, no shift).

  Args:
      left: ``uint8 [N, h, w, 1]`` digits of the left cells.
      right: ``uint8 [N, h, w, 1]`` digits of the right cells.
      cell_size: Side of each cell (``>= max(h, w)``).
      ink_threshold: A pixel belongs to a digit's mask when its value exceeds this.

  Returns:
      ``(images uint8 [N, cell_size, 2 * cell_size, 1], masks uint8 [N, cell_size, 2 * cell_size])`` with
      masks 0 for background, 1 for the left digit's pixels, 2 for the right one's.

  Raises:
      ValueError: If the shapes differ or the digits do not fit the cells.
  """
  validate_images(left, name="left")
  validate_images(right, name="right")
  if left.shape != right.shape or left.shape[3] != 1:
    raise ValueError(f"left and right must be equal 1-channel [N, h, w, 1], got {left.shape}, {right.shape}")
  n, h, w, _ = left.shape
  if max(h, w) > cell_size:
    raise ValueError(f"digits of {h}x{w} do not fit cells of {cell_size}")
  images = np.zeros((n, cell_size, 2 * cell_size, 1), np.uint8)
  masks = np.zeros((n, cell_size, 2 * cell_size), np.uint8)
  top, off = (cell_size - h) // 2, (cell_size - w) // 2
  for side, digits in enumerate((left, right)):
    x0 = off + side * cell_size
    images[:, top : top + h, x0 : x0 + w] = digits
    region = masks[:, top : top + h, x0 : x0 + w]
    region[digits[..., 0] > ink_threshold] = side + 1
  return images, masks


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" or word in ("8", "eight") else "a"


def subject_fields(*, left: int, right: int, subject_side: int, identifier: str) -> dict[str, str]:
  """Scene template fields with ``identifier`` before the subject's digit (see :func:`scene_fields`).

  E.g. ``left=4, right=7, subject_side=0, identifier="bwv"`` gives ``{a_left_digit}`` = ``"a bwv 4"``,
  ``{left_word}`` = ``"bwv four"`` and the right digit's fields unchanged.

  Raises:
      ValueError: If ``subject_side`` is not 0 (left) or 1 (right), or ``identifier`` is not one word.
  """
  if subject_side not in (0, 1):
    raise ValueError(f"subject_side must be 0 (left) or 1 (right), got {subject_side!r}")
  if not isinstance(identifier, str) or not identifier.isalnum():
    raise ValueError(f"identifier must be one alphanumeric word, got {identifier!r}")
  fields = scene_fields(left, right)
  side = ("left_", "right_")[subject_side]
  for kind in ("digit", "word"):
    named = f"{identifier} {fields[f'{side}{kind}']}"
    fields[f"{side}{kind}"] = named
    fields[f"a_{side}{kind}"] = f"{_article(identifier)} {named}"
  return fields


def subject_caption(
  *, subject: int, other: int, subject_side: int, identifier: str | None, template: str = SCENE_TEMPLATES[0]
) -> str:
  """A scene caption naming the subject with its identifier, e.g. ``"a bwv 4 to the left of a 7"``.

  With ``identifier=None`` the class caption of the same scene (``"a 4 to the left of a 7"``), the
  prompt of DreamBooth's class images and of its language-drift check.

  Args:
      subject: The subject's digit class.
      other: The digit in the other cell.
      subject_side: 0 when the subject is on the left, 1 on the right.
      identifier: The rare identifier word, or ``None``.
      template: A scene template (fields of :func:`diffjax.data.scene_fields`).

  Returns:
      The caption.
  """
  if subject_side not in (0, 1):
    raise ValueError(f"subject_side must be 0 (left) or 1 (right), got {subject_side!r}")
  left, right = (subject, other) if subject_side == 0 else (other, subject)
  if identifier is None:
    fields = scene_fields(left, right)
  else:
    fields = subject_fields(left=left, right=right, subject_side=subject_side, identifier=identifier)
  try:
    return template.format(**fields)
  except (KeyError, IndexError) as err:
    raise ValueError(f"template {template!r} uses an unknown field {err}; known: {sorted(fields)}") from None


def left_named_first(template: str) -> bool:
  """Whether a scene template names the left digit before the right one (``"{a_left_digit} to the ..."``)."""
  words = template.format(**scene_fields(0, 1)).split()
  first = next((w for w in words if w in ("0", "zero", "1", "one")), None)
  if first is None:
    raise ValueError(f"template {template!r} names no digit")
  return first in ("0", "zero")


def digit_word_positions(tokenizer, prompts: Sequence[str], *, num_words: int = 2) -> np.ndarray:
  """Token positions of the digit words of each prompt, in the order they appear.

  Digit words are ``"0"``-``"9"`` and ``"zero"``-``"nine"``, each one WordPiece; positions count the
  leading ``[CLS]`` as 0, so they index the rows of the encoder's hidden states.

  Args:
      tokenizer: A :class:`~diffjax.models.text_tokenizer.PromptTokenizer`.
      prompts: ``B`` prompts.
      num_words: Digit words each prompt must contain.

  Returns:
      ``int32 [B, num_words]``.

  Raises:
      ValueError: If a prompt does not contain exactly ``num_words`` digit words.
  """
  out = np.zeros((len(prompts), num_words), np.int32)
  for i, prompt in enumerate(prompts):
    found = [p for p, tok in enumerate(tokenizer.tokenize(prompt)) if tok in _DIGIT_TOKENS]
    if len(found) != num_words:
      raise ValueError(
        f"prompt {i} {prompt!r} has {len(found)} digit words (0-9 or zero-nine), expected {num_words}"
      )
    out[i] = found
  return out
