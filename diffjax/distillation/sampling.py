"""Generation with one forward pass per step: distilled students, guided students, conditional baselines.

:func:`diffjax.sampling.make_generate` always applies classifier-free guidance to a class-conditional
model (two passes per step, batched). Here the model is called once per step: a plain conditional model
(guidance must be 1), or a guided student that takes w as an input. An N-step progressive student samples
with deterministic DDIM on the trailing grid it was distilled on; the initial noise is drawn exactly as in
``make_generate``, so both start from the same x_T for the same key and labels (paired comparisons).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.distillation.guided import make_guided_model_fn
from diffjax.samplers import ddim_sample, dpm_solver_sample
from diffjax.samplers.timesteps import check_num_steps
from diffjax.schedules import Schedule
from diffjax.training.step import make_model_fn

ONE_PASS_SAMPLERS = ("ddim", "dpm_solver++")


def make_student_generate(
  *,
  model: nn.Module,
  schedule: Schedule,
  image_shape: Sequence[int],
  prediction: str = "v",
  sampler: str = "ddim",
  spacing: str = "trailing",
  clip_x0: float | None = 1.0,
) -> Callable:
  """Builds ``generate(params, key, labels, num_steps, guidance=1.0) -> [B, H, W, C]``, one pass per step.

  Args:
    model: a class-conditional U-Net; with ``guidance_embedding=True`` w is fed to it, otherwise the
      plain conditional prediction is used and ``guidance`` must be 1.
    schedule: the schedule it was trained (or distilled) with.
    image_shape: (H, W, C).
    prediction: its parameterisation.
    sampler: "ddim" (eta = 0; the students' sampler) or "dpm_solver++".
    spacing: the timestep grid; "trailing" is the grid the students are distilled on.
    clip_x0: static thresholding of the x estimates at sampling time (None disables).

  ``num_steps`` and ``guidance`` (a scalar or ``[B]``) are traced: new values do not recompile. The
  number of forward passes per sample is ``num_steps``.
  """
  if sampler not in ONE_PASS_SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {ONE_PASS_SAMPLERS}")
  if getattr(model, "num_classes", None) is None:
    raise ValueError("make_student_generate needs a class-conditional model (num_classes set)")
  guided = bool(getattr(model, "guidance_embedding", False))
  base = make_guided_model_fn(model) if guided else make_model_fn(model, train=False)
  sample = ddim_sample if sampler == "ddim" else dpm_solver_sample

  @jax.jit
  def generate(params, key, labels, num_steps, guidance):
    B = labels.shape[0]
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (B, *image_shape), jnp.float32)
    cond = {"label": labels, "w": jnp.broadcast_to(guidance, (B,))} if guided else labels
    return sample(
      model_fn=base,
      params=params,
      schedule=schedule,
      x_T=x_T,
      key=jax.random.fold_in(key, 1),
      cond=cond,
      num_steps=num_steps,
      spacing=spacing,
      prediction=prediction,
      clip_x0=clip_x0,
    )

  def checked(params, key, labels, num_steps=1, guidance=1.0):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] < 1:
      raise ValueError(f"labels must be a non-empty 1-D int array, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= model.num_classes:
      raise ValueError(f"labels must lie in [0, {model.num_classes}), got [{labels.min()}, {labels.max()}]")
    if not guided and np.any(np.asarray(guidance) != 1.0):
      raise ValueError("this model takes no guidance weight: guidance must be 1 (use a guided student)")
    check_num_steps(num_steps, schedule.num_timesteps)
    return generate(
      params,
      key,
      jnp.asarray(labels, jnp.int32),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
    )

  return checked
