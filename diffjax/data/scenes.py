"""Two-digit scenes: data on which the text matters.

A class label cannot say "a 3 to the left of a 5"; a caption can. :func:`make_scenes` composes canvases
from a digit dataset (MNIST, or sklearn's digits brought to MNIST's format by :func:`digits_as_mnist`):
each canvas is two cells of ``cell_size x cell_size`` side by side, one digit centred (with an optional
small random shift) in each cell, so with 28x28 digits and the default ``cell_size=32`` a scene is
``32 x 64``, which halves cleanly three times (to ``4 x 8``) for a U-Net or an autoencoder. Each scene
keeps both labels ``(left, right)``, a mask of each digit's pixels, and a caption whose left/right
wording is exact: ``"a 3 to the left of a 5"`` and ``"a 5 to the right of a 3"`` describe the same
scene. Everything is drawn from ``np.random.default_rng(seed)``.

To judge a generated scene, :func:`judge_scenes` cuts it into its two cells, centre-crops (and if needed
resizes) each to the input of a judge classifier (:mod:`diffjax.eval.judge`) and returns both predicted
digits; :func:`score_scenes` then says how often both are right, in the stated order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from diffjax.data.captions import check_templates, digit_fields
from diffjax.data.sources import ImageDataset, load_digits, validate_images

__all__ = [
  "SCENE_TEMPLATES",
  "SceneDataset",
  "digits_as_mnist",
  "judge_scenes",
  "make_scenes",
  "scene_caption",
  "scene_fields",
  "scene_halves",
  "score_scenes",
]

SCENE_TEMPLATES = (
  "{a_left_digit} to the left of {a_right_digit}",
  "{a_right_digit} to the right of {a_left_digit}",
  "{a_left_word} to the left of {a_right_word}",
  "{a_right_word} to the right of {a_left_word}",
  "{a_left_digit} on the left and {a_right_digit} on the right",
)


def scene_fields(left: int, right: int) -> dict[str, str]:
  """Template fields of a scene: :func:`~diffjax.data.captions.digit_fields` with ``left_``/``right_``.

  E.g. ``{left_digit}`` = ``"3"``, ``{a_right_word}`` = ``"an eight"``.
  """
  return {**digit_fields(left, prefix="left_"), **digit_fields(right, prefix="right_")}


def scene_caption(*, left: int, right: int, template: str = SCENE_TEMPLATES[0]) -> str:
  """The caption of a scene, e.g. ``scene_caption(left=3, right=5) == "a 3 to the left of a 5"``.

  Raises:
      ValueError: If a digit is out of range or ``template`` uses an unknown field.
  """
  (template,) = check_templates([template], scene_fields(0, 0))
  return template.format(**scene_fields(left, right))


@dataclasses.dataclass(frozen=True, eq=False)
class SceneDataset:
  """Captioned two-digit scenes held in host memory.

  Attributes:
      images: ``uint8 [N, H, W, 1]`` canvases, ``W == 2 * H``: the left digit in ``[:, :, :W/2]``, the
          right one in ``[:, :, W/2:]``.
      labels: ``int32 [N, 2]``: (left digit, right digit).
      captions: ``N`` captions (a tuple of strings).
      masks: ``uint8 [N, H, W]``: 0 background, 1 pixels of the left digit, 2 of the right digit.
      template_ids: ``int32 [N]``: which template wrote each caption.
      source_indices: ``int32 [N, 2]``: indices of the two digits in the source dataset.
      name: Human-readable identity, e.g. ``"scenes(mnist_idx/test, seed=0)"``.
  """

  images: np.ndarray
  labels: np.ndarray
  captions: tuple[str, ...]
  masks: np.ndarray
  template_ids: np.ndarray
  source_indices: np.ndarray
  name: str

  def __post_init__(self) -> None:
    validate_images(self.images, name="images")
    n, h, w, c = self.images.shape
    if c != 1 or w != 2 * h:
      raise ValueError(f"images must be [N, H, 2H, 1] scenes, got shape {self.images.shape}")
    object.__setattr__(self, "captions", tuple(self.captions))
    checks = (
      ("labels", self.labels, np.int32, (n, 2)),
      ("masks", self.masks, np.uint8, (n, h, w)),
      ("template_ids", self.template_ids, np.int32, (n,)),
      ("source_indices", self.source_indices, np.int32, (n, 2)),
    )
    for field, value, dtype, shape in checks:
      if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
        got = f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}"
        raise ValueError(f"{field} must be {np.dtype(dtype)} {list(shape)}, got {got}")
    if len(self.captions) != n or not all(isinstance(s, str) for s in self.captions):
      raise ValueError(f"captions must be {n} strings, got {len(self.captions)} items")
    if self.labels.min() < 0 or self.labels.max() > 9:
      raise ValueError(f"labels must be digits 0..9, got range [{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one scene."""
    return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

  def fingerprint(self) -> str:
    """SHA-256 hex digest of the images, labels, masks and captions (same data, same digest)."""
    digest = hashlib.sha256()
    for array in (self.images, self.labels, self.masks):
      digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(list(self.captions)).encode("utf-8"))
    return digest.hexdigest()

  def subset(self, indices: np.ndarray, *, name: str | None = None) -> SceneDataset:
    """Returns a new dataset with the scenes at ``indices`` (int ``[M]``)."""
    idx = np.asarray(indices)
    return SceneDataset(
      images=self.images[idx],
      labels=self.labels[idx],
      captions=tuple(self.captions[int(i)] for i in idx),
      masks=self.masks[idx],
      template_ids=self.template_ids[idx],
      source_indices=self.source_indices[idx],
      name=self.name if name is None else name,
    )


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


def digits_as_mnist(
  ds: ImageDataset | None = None, *, box: int = 20, size: int = 28, resample: str = "bicubic"
) -> ImageDataset:
  """Brings sklearn's 8x8 digits to MNIST's format: each digit resized to ``box`` and centred in ``size``.

  MNIST digits are scaled to a 20x20 box and centred in a 28x28 frame (LeCun et al. 1998); the 8x8
  digits fill their frame, so they are resized to ``box x box`` and padded.

  Args:
      ds: A 1-channel dataset; ``None`` loads :func:`~diffjax.data.load_digits`.
      box: Side of the resized digit.
      size: Side of the output frame (``>= box``).
      resample: ``"bicubic"`` (smooth) or ``"nearest"`` (blocks; with ``box = 3 * 8`` the
          area-average of :func:`scene_halves` with ``crop=box, size=8`` gives the 8x8 digits back
          exactly).

  Returns:
      ImageDataset ``uint8 [N, size, size, 1]`` with the same labels, named ``"<name>@<size>"``.

  Raises:
      ValueError: If ``box > size``, ``resample`` is unknown or ``ds`` is not single-channel.
  """
  ds = load_digits() if ds is None else ds
  if not 0 < box <= size:
    raise ValueError(f"box must be in [1, size={size}], got {box}")
  if resample not in _RESAMPLE:
    raise ValueError(f"resample={resample!r} is not one of {sorted(_RESAMPLE)}")
  if ds.image_shape[2] != 1:
    raise ValueError(f"digits_as_mnist needs 1-channel images, got shape {ds.image_shape}")
  out = np.zeros((len(ds), size, size, 1), np.uint8)
  top = (size - box) // 2
  for i, image in enumerate(ds.images[..., 0]):
    resized = Image.fromarray(image).resize((box, box), _RESAMPLE[resample])
    out[i, top : top + box, top : top + box, 0] = np.asarray(resized)
  return ImageDataset(images=out, labels=ds.labels, num_classes=ds.num_classes, name=f"{ds.name}@{size}")


def _draw_pairs(rng: np.random.Generator, labels: np.ndarray, num: int, distinct: bool) -> np.ndarray:
  pairs = rng.integers(0, labels.shape[0], size=(num, 2))
  if distinct:
    if np.unique(labels).size < 2:
      raise ValueError("distinct=True needs at least two different digits in the source dataset")
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    while same.any():
      pairs[same, 1] = rng.integers(0, labels.shape[0], size=int(same.sum()))
      same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
  return pairs


def make_scenes(
  source: ImageDataset,
  *,
  num_scenes: int,
  seed: int,
  templates: Sequence[str] = SCENE_TEMPLATES,
  cell_size: int = 32,
  max_shift: int = 2,
  distinct: bool = False,
  ink_threshold: int = 0,
) -> SceneDataset:
  """Composes captioned two-digit scenes from a digit dataset.

  Args:
      source: 1-channel digits with labels 0..9 and images ``[h, w]`` with
          ``max(h, w) + 2 * max_shift <= cell_size`` (MNIST, or :func:`digits_as_mnist`).
      num_scenes: Number of scenes N (>= 1).
      seed: Seed of every draw (digits, shifts, templates).
      templates: Caption templates with the fields of :func:`scene_fields`, one drawn per scene.
      cell_size: Side of each digit's cell; scenes are ``cell_size x 2 * cell_size``.
      max_shift: Each digit moves by up to this many pixels per axis from its cell's centre.
      distinct: Only pairs of different digits (so that the order is always visible).
      ink_threshold: A pixel belongs to a digit's mask when its value exceeds this.

  Returns:
      The scenes, named ``"scenes(<source name>, seed=<seed>)"``.

  Raises:
      ValueError: On a multi-channel or non-digit source, digits that do not fit the cells, or bad
          counts and templates.
  """
  if isinstance(num_scenes, bool) or not isinstance(num_scenes, int | np.integer) or num_scenes < 1:
    raise ValueError(f"num_scenes must be an int >= 1, got {num_scenes!r}")
  h, w, c = source.image_shape
  if c != 1:
    raise ValueError(f"scenes need 1-channel digits, got source image shape {source.image_shape}")
  if source.labels.max() > 9:
    raise ValueError(f"scenes need digit labels 0..9, got max label {source.labels.max()}")
  if max_shift < 0 or max(h, w) + 2 * max_shift > cell_size:
    raise ValueError(
      f"digits of {h}x{w} with max_shift={max_shift} do not fit cells of {cell_size}: "
      f"need max(h, w) + 2 * max_shift <= cell_size"
    )
  templates = check_templates(templates, scene_fields(0, 0))
  rng = np.random.default_rng(seed)
  pairs = _draw_pairs(rng, source.labels, int(num_scenes), distinct)
  shifts = rng.integers(-max_shift, max_shift + 1, size=(num_scenes, 2, 2))
  template_ids = rng.integers(0, len(templates), size=num_scenes).astype(np.int32)

  images = np.zeros((num_scenes, cell_size, 2 * cell_size, 1), np.uint8)
  masks = np.zeros((num_scenes, cell_size, 2 * cell_size), np.uint8)
  top, left = (cell_size - h) // 2, (cell_size - w) // 2
  for i in range(num_scenes):
    for side in (0, 1):
      digit = source.images[pairs[i, side]]
      y = top + shifts[i, side, 0]
      x = left + shifts[i, side, 1] + side * cell_size
      images[i, y : y + h, x : x + w] = digit
      masks[i, y : y + h, x : x + w][digit[..., 0] > ink_threshold] = side + 1
  labels = source.labels[pairs].astype(np.int32)
  captions = tuple(
    templates[t].format(**scene_fields(int(a), int(b)))
    for (a, b), t in zip(labels, template_ids, strict=True)
  )
  return SceneDataset(
    images=images,
    labels=labels,
    captions=captions,
    masks=masks,
    template_ids=template_ids,
    source_indices=pairs.astype(np.int32),
    name=f"scenes({source.name}, seed={seed})",
  )


def _resize(x: np.ndarray, size: int) -> np.ndarray:
  """Resizes float ``[N, s, s, C]`` squares to ``size``: area average for integer factors, else linear."""
  n, side, _, c = x.shape
  if side % size == 0:
    f = side // size
    return x.reshape(n, size, f, size, f, c).mean(axis=(2, 4), dtype=np.float32)
  import jax  # Local: keeps `diffjax.data` free of a JAX import at load time.

  out = jax.image.resize(x, (n, size, size, c), method="linear", antialias=True)
  return np.asarray(out, dtype=np.float32)


def scene_halves(images: Any, *, size: int, crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Cuts scenes into their left and right cells, centre-crops each and resizes it to ``size``.

  Args:
      images: ``[N, H, W, C]`` scenes, ``uint8`` in 0..255 or float in ``[-1, 1]``; ``W`` even.
      size: Side of the output squares (the judge's input).
      crop: Side of the centred square cut from each cell before resizing; ``None`` uses
          ``min(size, H, W / 2)``. With 32x64 MNIST scenes and ``size=28`` the crop is 28 and no
          resizing happens.

  Returns:
      ``(left, right)``, each ``[N, size, size, C]``: ``uint8`` when no resizing was needed and the
      input was ``uint8``, otherwise float32 in ``[-1, 1]``. Cells are shrunk by area averaging when
      ``crop`` is a multiple of ``size``, and resized linearly (antialiased) otherwise.

  Raises:
      ValueError: If ``images`` is not ``[N, H, W, C]`` with even ``W``, or ``crop`` exceeds a cell.
  """
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[0] < 1 or x.shape[2] % 2:
    raise ValueError(f"images must be non-empty [N, H, W, C] scenes with even W, got shape {x.shape}")
  h, half = x.shape[1], x.shape[2] // 2
  crop = min(size, h, half) if crop is None else int(crop)
  if not 0 < crop <= min(h, half):
    raise ValueError(f"crop={crop} must be in [1, {min(h, half)}] for cells of {h}x{half}")
  y0, x0 = (h - crop) // 2, (half - crop) // 2
  cells = [x[:, y0 : y0 + crop, side * half + x0 : side * half + x0 + crop] for side in (0, 1)]
  if crop == size:
    return cells[0], cells[1]
  if x.dtype == np.uint8:
    cells = [c.astype(np.float32) / np.float32(127.5) - np.float32(1.0) for c in cells]
  return _resize(cells[0], size), _resize(cells[1], size)


def _judge_size(judge_params: Any) -> int:
  try:
    flat = int(judge_params["features"]["kernel"].shape[0])
  except (KeyError, TypeError, AttributeError):
    raise ValueError("judge_params is not a judge parameter tree (expected ['features']['kernel'])") from None
  half = math.isqrt(flat // 64)
  if half * half * 64 != flat:
    raise ValueError(f"cannot infer a square judge input from a feature layer of {flat} inputs; pass size")
  return 2 * half


def judge_scenes(
  judge_params: Any, images: Any, *, size: int | None = None, crop: int | None = None, batch_size: int = 500
) -> np.ndarray:
  """The digits a judge classifier sees in the left and right cells of each scene.

  Args:
      judge_params: Parameters of a :class:`diffjax.eval.JudgeCNN` (e.g. from
          :func:`diffjax.eval.load_judge`).
      images: ``[N, H, W, C]`` scenes, ``uint8`` or float in ``[-1, 1]``.
      size: The judge's input side; ``None`` infers it from the judge (even sides, e.g. 28 or 8).
      crop: See :func:`scene_halves` (e.g. 20 to cut the digit box of :func:`digits_as_mnist` scenes
          for an 8x8 judge).
      batch_size: Images per judge forward pass.

  Returns:
      ``int32 [N, 2]``: predicted (left, right) digits.
  """
  from diffjax.eval import logits  # Local: diffjax.eval imports diffjax.data.

  size = _judge_size(judge_params) if size is None else int(size)
  left, right = scene_halves(images, size=size, crop=crop)
  n = left.shape[0]
  out = logits(judge_params, np.concatenate([left, right]), batch_size=batch_size)
  predicted = np.argmax(out, axis=1).astype(np.int32)
  return np.stack([predicted[:n], predicted[n:]], axis=1)


def score_scenes(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
  """How often predicted scene digits match the stated ones.

  Args:
      predicted: ``int [N, 2]`` (left, right) digits, e.g. from :func:`judge_scenes`.
      labels: ``int [N, 2]`` the digits the captions asked for.

  Returns:
      ``{"both": P(both right, in order), "left": P(left right), "right": P(right right),
      "swapped": P(both right but in reversed order) among scenes of two different digits}``
      (``swapped`` is ``None`` when every scene shows one digit twice).

  Raises:
      ValueError: If the shapes differ or are not ``[N, 2]``.
  """
  p, y = np.asarray(predicted), np.asarray(labels)
  if p.shape != y.shape or p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 1:
    raise ValueError(f"predicted and labels must both be [N, 2], got {p.shape} and {y.shape}")
  distinct = y[:, 0] != y[:, 1]
  swapped = np.all(p[distinct] == y[distinct, ::-1], axis=1)
  return {
    "both": float(np.mean(np.all(p == y, axis=1))),
    "left": float(np.mean(p[:, 0] == y[:, 0])),
    "right": float(np.mean(p[:, 1] == y[:, 1])),
    "swapped": float(np.mean(swapped)) if distinct.any() else None,
  }
