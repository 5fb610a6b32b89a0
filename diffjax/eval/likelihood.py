"""Held-out negative log-likelihood in bits/dim through the variational bound (Ho et al. 2020, Eq. 5).

The bound itself is :func:`diffjax.losses.nll_bits_per_dim` (exact over all T terms, or an unbiased
stratified estimate of the KL terms with L_0 exact); this module runs it over a whole held-out set in
batches and reports the mean with its standard error, as DDPM's Table 2 and Nichol & Dhariwal (2021)
report NLL on test data.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.data import ImageDataset, to_model_range
from diffjax.losses import nll_bits_per_dim
from diffjax.schedules import Schedule

__all__ = ["heldout_bits_per_dim"]


def heldout_bits_per_dim(
  *,
  model_fn,
  params: Any,
  schedule: Schedule,
  dataset: ImageDataset,
  key: jax.Array,
  prediction: str = "eps",
  conditional: bool = True,
  num_t_samples: int | None = 100,
  batch_size: int = 100,
) -> dict[str, Any]:
  """Mean NLL bound in bits/dim over every image of ``dataset``.

  Args:
    model_fn: ``model_fn(params, x_t, t, cond) -> prediction`` (evaluation mode).
    params: its parameters.
    schedule: the schedule it was trained with.
    dataset: held-out real images ``uint8 [N, H, W, C]`` (and labels, used as the condition when
      ``conditional``).
    key: PRNG key; batch ``i`` uses ``fold_in(key, i)``.
    prediction: the model's parameterisation.
    conditional: pass the labels as ``cond`` (a class-conditional model's likelihood given the class).
    num_t_samples: stratified timesteps per example, or ``None`` for the exact bound (T passes).
    batch_size: examples per jitted call; a last partial batch is padded and its padding dropped.

  Returns:
    ``{"bpd": mean, "bpd_stderr": standard error over examples (None for N = 1), "num_examples": N,
    "num_t_samples": num_t_samples}``.

  Raises:
    ValueError: If ``dataset`` is empty, ``batch_size < 1``, or a conditional evaluation has no labels.
  """
  n = len(dataset)
  if n < 1:
    raise ValueError("dataset must hold at least one image")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if conditional and dataset.labels is None:
    raise ValueError(f"dataset {dataset.name!r} has no labels for a conditional model")

  @jax.jit
  def batch_bpd(images, labels, k):
    return nll_bits_per_dim(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x0=images,
      cond=labels,
      key=k,
      prediction=prediction,
      num_t_samples=num_t_samples,
    )["bpd"]

  bs = min(batch_size, n)
  out = []
  for i, start in enumerate(range(0, n, bs)):
    idx = np.arange(start, start + bs) % n  # pad the last batch by wrapping; dropped below
    images = jnp.asarray(to_model_range(dataset.images[idx]))
    labels = jnp.asarray(dataset.labels[idx]) if conditional else None
    bpd = np.asarray(batch_bpd(images, labels, jax.random.fold_in(key, i)))
    out.append(bpd[: min(bs, n - start)])
  bpd = np.concatenate(out).astype(np.float64)
  return {
    "bpd": float(bpd.mean()),
    "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
    "num_examples": int(n),
    "num_t_samples": num_t_samples,
  }
