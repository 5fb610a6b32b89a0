"""What DreamBooth and FastComposer runs share: the base text-to-image run, its digits and class images.

Both personalisation methods start from a trained text-to-image work directory on two-digit scenes
(:mod:`diffjax.training.text_loop`), named by ``config.base_workdir``. Subjects must be digits the base
model never saw: :func:`base_digits` rebuilds the base run's split of its digit source into the digits
its training scenes were composed from and the held-out ones (same source, holdout count and seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np

from diffjax.data import ImageDataset, load_dataset, split_holdout, to_uint8
from diffjax.text_sampling import make_text_generate
from diffjax.training.text_builders import TextRun, load_text_run

__all__ = ["base_data_config", "base_digits", "class_images", "load_base", "text_generate"]


def load_base(config: ml_collections.ConfigDict) -> TextRun:
  """The base text-to-image run (EMA parameters) of ``config.base_workdir``.

  Raises:
      FileNotFoundError: If the work directory or its checkpoints are missing.
      ValueError: If it is not a text-to-image run.
  """
  path = config.get("base_workdir")
  if not path:
    raise ValueError("config.base_workdir must name a trained text-to-image work directory")
  return load_text_run(path)


def base_data_config(
  base_config: ml_collections.ConfigDict, data_path: str | None
) -> ml_collections.ConfigDict:
  """The base run's config with ``data.path`` replaced by ``data_path`` when one is given.

  A base config may store a path relative to where it was trained (``../shared/data/mnist``);
  personalisation configs carry ``data_path`` to point at the same files from elsewhere.
  """
  config = ml_collections.ConfigDict(base_config.to_dict())
  if data_path:
    config.data.path = data_path
  return config


def base_digits(base_config: ml_collections.ConfigDict) -> tuple[ImageDataset, ImageDataset]:
  """``(train_digits, heldout_digits)`` exactly as the base run split its digit source.

  Raises:
      FileNotFoundError: If the digit files are missing.
  """
  d = base_config.data
  digits = load_dataset(source=d.source, path=d.get("path"), split=d.split, data_dir=d.get("data_dir"))
  return split_holdout(digits, holdout=d.holdout, seed=base_config.seed)


def text_generate(run: TextRun):
  """``generate(params, key, cond, num_steps, guidance)`` of a text-to-image run (DDIM, uniform spacing)."""
  return make_text_generate(
    model_fn=run.model_fn,
    schedule=run.schedule,
    sample_shape=run.sample_shape,
    null_cond=run.prompts.null_condition(),
    prediction=run.config.diffusion.prediction,
    codec=run.codec,
  )


def class_images(
  run: TextRun,
  prompts: list[str],
  *,
  guidance: float,
  num_steps: int,
  batch_size: int,
  seed: int,
  cache_dir: str | None = None,
) -> tuple[np.ndarray, float]:
  """Images the base model generates for ``prompts`` (DreamBooth's class images), cached on disk.

  Batch ``i`` uses ``fold_in(key(seed), i)``. The cache file ``class_images_<digest>.npz`` (no pickle)
  is keyed by the base model's parameters, the prompts and the sampler settings, so a changed base
  model or prompt list never reuses stale images.

  Returns:
      ``(uint8 [M, H, W, C] images, seconds spent generating)`` (0 seconds when read from the cache).
  """
  digest = hashlib.sha256(json.dumps([prompts, guidance, num_steps, seed]).encode())
  for leaf in jax.tree.leaves(jax.device_get(run.params)):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  path = os.path.join(cache_dir, f"class_images_{digest.hexdigest()[:16]}.npz") if cache_dir else None
  if path and os.path.isfile(path):
    with np.load(path, allow_pickle=False) as f:
      return f["images"], 0.0
  generate = text_generate(run)
  cond = run.prompts.encode(prompts)
  key = jax.random.key(seed)
  t0 = time.perf_counter()
  out = []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    part = tuple(c[start : start + batch_size] for c in cond)
    images = generate(run.params, jax.random.fold_in(key, i), part, num_steps=num_steps, guidance=guidance)
    out.append(to_uint8(np.asarray(jax.device_get(images))))
  images = np.concatenate(out)
  seconds = time.perf_counter() - t0
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images, prompts=np.asarray(prompts))
    os.replace(tmp, path)
  return images, seconds
