"""What ``personalization.py`` measures generated scenes with: judge features of cells, fidelity, drift.

Every generated scene is cut into its two 32x32 cells; the central 28x28 of each goes through the MNIST
judge (:mod:`diffjax.eval.judge`). Its class prediction says whether a cell shows the stated digit;
its 128-d penultimate features (ReLU) say how much a cell looks like the subject's reference images:
*subject fidelity* is the cosine similarity of the subject cell's features to the references' features,
both centred on the mean feature of real digits (ReLU features are all positive, so raw cosines of any
two images are high and compressed), averaged over the references (DreamBooth's DINO/CLIP-I metric, Ruiz et al. 2023 Sec. 4.1, with the judge
as the feature extractor). Language drift (DreamBooth Sec. 4.3) is measured on class prompts without the
identifier: how much their cells look like the subject (lower is better: the class was not replaced by
the subject) and their diversity, the mean pairwise cosine distance of their features (higher is better).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from diffjax.data import scene_halves, to_model_range, to_uint8
from diffjax.eval import features_and_logits


def judge_size(judge) -> int:
  """Side of the judge's square input (28 for the MNIST judge)."""
  flat = int(judge["features"]["kernel"].shape[0])
  return 2 * round((flat / 64) ** 0.5)


def cells(images: np.ndarray, sides: np.ndarray, *, size: int, crop: int | None = None):
  """``(subject cells, other cells)``: the cell on ``sides`` (0 left, 1 right) and the opposite one."""
  left, right = scene_halves(images, size=size, crop=crop)
  pick = (np.asarray(sides) == 0).reshape(-1, 1, 1, 1)
  return np.where(pick, left, right), np.where(pick, right, left)


CENTER: dict[str, np.ndarray] = {}  # "mean": the mean judge feature of real digits, set by the experiment


def judged(judge, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(centred, L2-normalised features [N, 128], predicted digits [N])`` (centred on ``CENTER["mean"]``)."""
  feats, logits = features_and_logits(judge, images)
  feats = feats - CENTER.get("mean", 0.0)
  norm = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)
  return norm, np.argmax(logits, axis=1)


def cosine_to(feats: np.ndarray, refs: np.ndarray) -> np.ndarray:
  """``[N]`` mean cosine similarity of each row of ``feats`` to the rows of ``refs`` (both normalised)."""
  return (feats @ refs.T).mean(axis=1)


def diversity(feats: np.ndarray) -> float:
  """Mean pairwise cosine distance among the rows of ``feats`` (normalised)."""
  n = feats.shape[0]
  sim = feats @ feats.T
  return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


def mean_se(values: np.ndarray) -> dict:
  """``{"mean", "se"}`` of a sample (standard error of the mean)."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0}


def subject_metrics(
  judge, images, *, sides, label: int, others, ref_feats, size: int, crop: int | None = None
) -> dict:
  """Fidelity and prompt fidelity of scenes showing a subject of class ``label`` on ``sides``.

  Returns:
      ``subject_fidelity`` (mean/se of the cosine of subject cells to the references), ``subject_acc``
      (subject cells judged ``label``), ``other_acc`` (other cells judged the stated digit), ``both`` (both
      right, in order) and ``diversity`` of the subject cells.
  """
  subj, other = cells(images, sides, size=size, crop=crop)
  f_s, p_s = judged(judge, subj)
  _, p_o = judged(judge, other)
  return {
    "subject_fidelity": mean_se(cosine_to(f_s, ref_feats)),
    "subject_acc": float(np.mean(p_s == label)),
    "other_acc": float(np.mean(p_o == np.asarray(others))),
    "both": float(np.mean((p_s == label) & (p_o == np.asarray(others)))),
    "diversity": diversity(f_s),
  }


def pair_metrics(
  judge, images, *, labels: np.ndarray, ref_feats: np.ndarray, size: int, crop: int | None = None
) -> dict:
  """Two-subject scenes: order, swaps, merges and identity of each cell.

  Args:
      labels: ``int [N, 2]`` stated (left, right) digits (always two different classes).
      ref_feats: ``[N, 2, F]`` normalised features of the left and right subjects' references.

  Returns:
      ``both`` (both cells the stated digits in order), ``swapped`` (both digits, reversed order),
      ``merged`` (both cells judged the same digit: one subject drawn twice or a blend), ``own_fidelity``
      (cosine of each cell to its own subject's reference), ``cross_fidelity`` (to the other subject's)
      and ``identity_margin`` (own minus cross; > 0 when each cell resembles its own subject more).
  """
  left, right = scene_halves(images, size=size, crop=crop)
  f_l, p_l = judged(judge, left)
  f_r, p_r = judged(judge, right)
  own = np.concatenate([np.sum(f_l * ref_feats[:, 0], 1), np.sum(f_r * ref_feats[:, 1], 1)])
  cross = np.concatenate([np.sum(f_l * ref_feats[:, 1], 1), np.sum(f_r * ref_feats[:, 0], 1)])
  return {
    "both": float(np.mean((p_l == labels[:, 0]) & (p_r == labels[:, 1]))),
    "swapped": float(np.mean((p_l == labels[:, 1]) & (p_r == labels[:, 0]))),
    "merged": float(np.mean(p_l == p_r)),
    "own_fidelity": mean_se(own),
    "cross_fidelity": mean_se(cross),
    "identity_margin": mean_se(own - cross),
  }


def sample_batches(fn, num: int, *, batch_size: int, seed: int, warm_up: bool) -> tuple[np.ndarray, float]:
  """Calls ``fn(start, stop, key)`` over batches (batch ``i`` with ``fold_in(key(seed), i)``).

  With ``warm_up`` the first batch is run once more before the clock starts (to compile the sampler,
  which the callers share between models of one architecture), so the seconds are sampling only.

  Returns:
      ``(uint8 images, seconds)``.
  """
  if num % batch_size:
    raise ValueError(f"num={num} must be a multiple of batch_size={batch_size} (one compiled shape)")
  key = jax.random.key(seed)
  if warm_up:
    jax.block_until_ready(fn(0, batch_size, key))
  out, t0 = [], time.perf_counter()
  for i, start in enumerate(range(0, num, batch_size)):
    images = fn(start, start + batch_size, jax.random.fold_in(key, i))
    out.append(to_uint8(np.asarray(jax.device_get(images))))
  return np.concatenate(out), time.perf_counter() - t0


def reference_input(images_uint8: np.ndarray) -> np.ndarray:
  """Reference digits as the subject encoder takes them: float32 in ``[-1, 1]``."""
  return to_model_range(np.asarray(images_uint8))
