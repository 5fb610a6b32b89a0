"""Class-conditional generation from a trained denoiser: one jitted function per image shape.

``make_generate`` returns ``generate(params, key, labels, num_steps, guidance, eta) -> images`` in
which the step count, guidance weight and eta are traced values (a new value does not recompile);
the sampler, spacing and parameterisation are fixed when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.guidance import classifier_free_guidance
from diffjax.samplers import SAMPLERS, ddim_sample, ddpm_sample, dpm_solver_sample
from diffjax.samplers.timesteps import check_num_steps
from diffjax.schedules import Schedule
from diffjax.training.step import make_model_fn


def make_generate(
  *,
  model: nn.Module,
  schedule: Schedule,
  image_shape: Sequence[int],
  sampler: str = "ddim",
  prediction: str = "eps",
  spacing: str | None = None,
  variance: str = "small",
  clip_x0: float | None = 1.0,
  model_fn: Callable | None = None,
) -> Callable:
  """Builds a jitted ``generate(params, key, labels, num_steps, guidance, eta) -> [B, H, W, C]``.

  Args:
    model: a class-conditional (``model.num_classes`` set) or unconditional denoiser.
    schedule: the schedule it was trained with.
    image_shape: (H, W, C).
    sampler: "ddim", "ddpm" (ancestral over all T steps; ``num_steps`` and ``eta`` are ignored) or
      "dpm_solver++" (DPM-Solver++(2M), deterministic; ``eta`` is ignored).
    prediction: the model's parameterisation.
    spacing: timestep spacing of "ddim" / "dpm_solver++"; None picks the sampler's default, "uniform"
      for DDIM and "trailing" for DPM-Solver++ (which is poor on "uniform", whose last steps reach t = 0).
    variance: DDPM reverse variance, "small" or "large".
    clip_x0: clip of the predicted clean image at every step (None: no clipping, as DDIM's own code).
    model_fn: replaces ``model.apply`` as ``model_fn(params, x_t, t, cond)`` (e.g. a fake-quantized
      model's, :mod:`diffjax.quantization`, whose ``params`` are its variables); ``model`` still gives the
      class count.

  The returned function takes labels ``[B]`` int (ignored for an unconditional model, whose batch
  size it still sets) and a guidance scale (scalar or ``[B]``); w = 1 means no guidance.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
  if spacing is None:
    spacing = "trailing" if sampler == "dpm_solver++" else "uniform"
  base = make_model_fn(model, train=False) if model_fn is None else model_fn
  conditional = getattr(model, "num_classes", None) is not None

  @jax.jit
  def generate(params, key, labels, num_steps, guidance, eta):
    B = labels.shape[0]
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (B, *image_shape), jnp.float32)
    if conditional:
      model_fn = classifier_free_guidance(
        base,
        guidance_scale=guidance,
        null_cond=jnp.full_like(labels, model.num_classes),
        skip_unconditional_at_one=True,
      )
      cond = labels
    else:
      model_fn, cond = base, None
    k = jax.random.fold_in(key, 1)
    if sampler == "ddpm":
      return ddpm_sample(
        model_fn=model_fn,
        params=params,
        schedule=schedule,
        x_T=x_T,
        key=k,
        cond=cond,
        variance=variance,
        prediction=prediction,
        clip_x0=clip_x0,
      )
    if sampler == "dpm_solver++":
      return dpm_solver_sample(
        model_fn=model_fn,
        params=params,
        schedule=schedule,
        x_T=x_T,
        key=k,
        cond=cond,
        num_steps=num_steps,
        spacing=spacing,
        prediction=prediction,
        clip_x0=clip_x0,
      )
    return ddim_sample(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_T=x_T,
      key=k,
      cond=cond,
      num_steps=num_steps,
      eta=eta,
      spacing=spacing,
      prediction=prediction,
      clip_x0=clip_x0,
    )

  def checked(params, key, labels, num_steps=50, guidance=1.0, eta=0.0):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] < 1:
      raise ValueError(f"labels must be a non-empty 1-D int array, got shape {labels.shape}")
    if conditional and (labels.min() < 0 or labels.max() >= model.num_classes):
      bad = labels[(labels < 0) | (labels >= model.num_classes)][0]
      raise ValueError(f"label {int(bad)} is out of range [0, {model.num_classes})")
    if sampler != "ddpm":
      check_num_steps(num_steps, schedule.num_timesteps)
    return generate(
      params,
      key,
      jnp.asarray(labels, jnp.int32),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(eta, jnp.float32),
    )

  return checked
