"""A small CNN classifier ("judge") whose penultimate activations are the features for evaluation.

FID (Heusel et al. 2017) and improved precision/recall (Kynkäänniemi et al. 2019) are defined on the
features of a pretrained network, classically Inception-v3. For 8x8 digits and 28x28 MNIST-like grey
images ``diffjax`` instead trains a small classifier on the real data: its 128-d penultimate layer gives
the features, and its predictions give the class accuracy of class-conditional samples. Scores are
only comparable between evaluations that use the same judge (same file, same training data).

Architecture (Flax Linen, NHWC, inputs in ``[-1, 1]``)::

    conv1 3x3 32 -> ReLU -> conv2 3x3 64 -> ReLU -> max-pool 2x2 -> flatten
    -> features: dense 128 -> ReLU (the features) -> head: dense num_classes (the logits)
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax.data import ImageDataset, get_batch, split_holdout, to_model_range
from diffjax.training.state import make_optimizer

__all__ = ["FEATURE_DIM", "JudgeCNN", "features", "features_and_logits", "logits", "train_judge"]

logger = logging.getLogger(__name__)

FEATURE_DIM = 128
JUDGE_FORMAT = "diffjax-judge/1"


class JudgeCNN(nn.Module):
  """The judge network; ``__call__`` maps ``[B, H, W, C]`` images to ``([B, 128], [B, num_classes])``.

  Attributes:
      num_classes: Number of output classes.
      feature_dim: Width of the penultimate (feature) layer.
  """

  num_classes: int
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    return feats, nn.Dense(self.num_classes, name="head")(feats)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _forward(params, images, num_classes: int):
  return JudgeCNN(num_classes).apply({"params": params}, images)


def _num_classes(params) -> int:
  try:
    return int(params["head"]["kernel"].shape[-1])
  except (KeyError, TypeError, AttributeError, IndexError):
    raise ValueError("params is not a judge parameter tree (expected params['head']['kernel'])") from None


def _prepare_images(params, images) -> np.ndarray:
  """Validates ``images`` against the judge and returns float32 ``[N, H, W, C]`` in ``[-1, 1]``."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[0] < 1:
    raise ValueError(f"images must be a non-empty [N, H, W, C] array, got shape {x.shape}")
  x = to_model_range(x) if x.dtype == np.uint8 else x.astype(np.float32)
  channels = int(params["conv1"]["kernel"].shape[2])
  flat = int(params["features"]["kernel"].shape[0])
  h, w, c = x.shape[1:]
  if c != channels or (h // 2) * (w // 2) * 64 != flat:
    raise ValueError(
      f"images of shape [H, W, C]={[h, w, c]} do not fit this judge: it takes {channels} channel(s) "
      f"and images with (H // 2) * (W // 2) * 64 = {flat}"
    )
  return x


def features_and_logits(params, images, *, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Runs the judge in fixed-size batches (one compilation per image shape).

  Args:
      params: Judge parameters (the tree under ``'params'``).
      images: ``[N, H, W, C]`` float images in ``[-1, 1]``, or ``uint8`` images in 0..255 (converted with
          :func:`diffjax.data.to_model_range`).
      batch_size: Images per forward pass; the last batch is padded.

  Returns:
      ``(features, logits)``: float32 ``[N, 128]`` and float32 ``[N, num_classes]``.

  Raises:
      ValueError: If ``images`` has the wrong rank, channel count or size for this judge.
  """
  num_classes = _num_classes(params)
  x = _prepare_images(params, images)
  n = x.shape[0]
  bs = min(int(batch_size), n)
  feats, outs = [], []
  for start in range(0, n, bs):
    chunk = x[start : start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    f, lg = jax.device_get(_forward(params, chunk, num_classes))
    feats.append(np.asarray(f[: bs - pad]))
    outs.append(np.asarray(lg[: bs - pad]))
  return np.concatenate(feats).astype(np.float32), np.concatenate(outs).astype(np.float32)


def features(params, images, *, batch_size: int = 500) -> np.ndarray:
  """Judge features (penultimate ReLU activations), float32 ``[N, 128]``; see :func:`features_and_logits`."""
  return features_and_logits(params, images, batch_size=batch_size)[0]


def logits(params, images, *, batch_size: int = 500) -> np.ndarray:
  """Judge class logits, float32 ``[N, num_classes]``; see :func:`features_and_logits`."""
  return features_and_logits(params, images, batch_size=batch_size)[1]


def _random_shift(key: jax.Array, images: jnp.ndarray, max_shift: int) -> jnp.ndarray:
  """Shifts each image by an independent integer offset in ``[-max_shift, max_shift]`` per axis.

  Vacated pixels are filled with -1 (black background, pixel value 0).
  """
  if max_shift == 0:
    return images
  n, h, w, c = images.shape
  s = max_shift
  padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * s + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def _accuracy(params, ds: ImageDataset) -> float:
  return float(np.mean(np.argmax(logits(params, ds.images), axis=1) == ds.labels))


def train_judge(
  dataset: ImageDataset,
  *,
  seed: int = 0,
  steps: int = 1500,
  batch_size: int = 128,
  learning_rate: float = 2e-3,
  holdout: float | None = 0.1,
  max_shift: int | None = None,
  weight_decay: float = 1e-4,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains a judge classifier on ``dataset`` with AdamW, warm-up and cosine decay.

  Args:
      dataset: Labelled images ``uint8 [N, H, W, C]`` (H, W >= 2).
      seed: Seed of the held-out split, the batch order, the initialisation and the augmentation.
      steps: Optimiser steps (>= 2).
      batch_size: Examples per step.
      learning_rate: Peak learning rate.
      holdout: Held-out count or fraction for :func:`diffjax.data.split_holdout`; ``None`` or ``0``
          trains on everything and reports no held-out accuracy.
      max_shift: Augmentation: random shifts of up to this many pixels per axis. ``None`` picks 2 for
          images of at least 16 pixels a side (MNIST) and 1 for smaller ones (8x8 digits).
      weight_decay: AdamW decoupled weight decay.

  Returns:
      ``(params, info)``: the parameter tree and a JSON-friendly dict with ``format``, ``data_name``,
      ``data_fingerprint`` (of ``dataset``, before the split), ``image_shape`` ``[H, W, C]``,
      ``num_classes``, ``feature_dim``, ``heldout_accuracy`` (or ``None``), ``num_train``,
      ``num_heldout`` and the training settings.

  Raises:
      ValueError: On out-of-range settings or images too small for the network.
  """
  h, w, c = dataset.image_shape
  if min(h, w) < 2:
    raise ValueError(f"dataset images must be at least 2x2 for the judge, got {dataset.image_shape}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
    raise ValueError(f"steps must be an int >= 2, got {steps!r}")
  if max_shift is None:
    max_shift = 2 if min(h, w) >= 16 else 1
  if not 0 <= max_shift < min(h, w):
    raise ValueError(f"max_shift must be in [0, {min(h, w)}), got {max_shift}")
  if holdout:
    train, held = split_holdout(dataset, holdout=holdout, seed=seed)
  else:
    train, held = dataset, None

  model = JudgeCNN(dataset.num_classes)
  root = jax.random.key(seed)
  params = model.init(jax.random.fold_in(root, 0), jnp.zeros((1, h, w, c), jnp.float32))["params"]
  tx = make_optimizer(
    learning_rate=learning_rate,
    warmup_steps=min(100, steps // 10),
    total_steps=steps,
    decay="cosine",
    weight_decay=weight_decay,
  )
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, images, labels, step):
    images = _random_shift(jax.random.fold_in(jax.random.fold_in(root, 1), step), images, max_shift)

    def loss_fn(p):
      _, out = model.apply({"params": p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  loss = float("nan")
  for step in range(steps):
    batch = get_batch(train, step=step, seed=seed, global_batch_size=batch_size)
    params, opt_state, loss = step_fn(params, opt_state, batch["image"], batch["label"], step)
    if (step + 1) % 500 == 0:
      logger.info("judge step %d/%d loss %.4f", step + 1, steps, float(loss))
  params = jax.device_get(params)
  info = {
    "format": JUDGE_FORMAT,
    "data_name": dataset.name,
    "data_fingerprint": dataset.fingerprint(),
    "image_shape": [h, w, c],
    "num_classes": int(dataset.num_classes),
    "feature_dim": FEATURE_DIM,
    "heldout_accuracy": None if held is None else _accuracy(params, held),
    "num_train": len(train),
    "num_heldout": 0 if held is None else len(held),
    "final_train_loss": float(loss),
    "seed": int(seed),
    "steps": int(steps),
    "batch_size": int(batch_size),
    "learning_rate": float(learning_rate),
    "holdout": holdout,
    "max_shift": int(max_shift),
  }
  return params, info
