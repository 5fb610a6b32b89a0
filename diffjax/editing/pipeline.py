"""A jitted SDEdit for a trained class-conditional or unconditional denoiser (the ``edit`` command's engine).

``make_sdedit`` returns ``edit(params, key, images, labels, strength, num_steps, guidance, eta, mask)``:
strength, step count, guidance weight and eta are traced (a new value does not recompile), like
:func:`diffjax.sampling.make_generate`. Labels condition a class-conditional model (classifier-free
guidance with weight ``guidance``; 1 = plain conditional); a label equal to ``num_classes`` (the null
class) edits without a class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.data import to_model_range, to_uint8
from diffjax.editing.sdedit import SDEDIT_SAMPLERS, check_strength, sdedit
from diffjax.guidance import classifier_free_guidance
from diffjax.samplers.timesteps import check_num_steps
from diffjax.schedules import Schedule
from diffjax.training.step import make_model_fn

__all__ = ["make_sdedit"]


def make_sdedit(
  *,
  model: nn.Module,
  schedule: Schedule,
  image_shape: Sequence[int],
  sampler: str = "ddim",
  prediction: str = "eps",
  spacing: str = "trailing",
) -> Callable:
  """Builds a checked, jitted SDEdit over uint8 images.

  Args:
    model: the trained denoiser (class-conditional when ``model.num_classes`` is set).
    schedule: its schedule.
    image_shape: ``(H, W, C)`` of the model.
    sampler: "ddim" or "ddpm".
    prediction: the model's parameterisation.
    spacing: DDIM timestep spacing.

  Returns:
    ``edit(params, key, images, labels=None, strength=0.6, num_steps=50, guidance=1.0, eta=0.0,
    mask=None) -> uint8 [B, H, W, C]``: ``images`` uint8 ``[B, H, W, C]``; ``labels`` int ``[B]``
    (None: the null class for a conditional model); ``mask`` ``[B, H, W, 1]`` in [0, 1], 1 = free to
    change, or None.
  """
  if sampler not in SDEDIT_SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {SDEDIT_SAMPLERS}")
  image_shape = tuple(int(d) for d in image_shape)
  base = make_model_fn(model, train=False)
  nc = getattr(model, "num_classes", None)

  @jax.jit
  def run(params, key, x, labels, strength, num_steps, guidance, eta, mask):
    if nc is not None:
      model_fn = classifier_free_guidance(
        base, guidance_scale=guidance, null_cond=jnp.full_like(labels, nc), skip_unconditional_at_one=True
      )
      cond = labels
    else:
      model_fn, cond = base, None
    return sdedit(
      model_fn=model_fn,
      params=params,
      schedule=schedule,
      x_guide=x,
      key=key,
      strength=strength,
      cond=cond,
      mask=mask,
      sampler=sampler,
      num_steps=num_steps,
      eta=eta,
      spacing=spacing,
      prediction=prediction,
    )

  def edit(params, key, images, labels=None, strength=0.6, num_steps=50, guidance=1.0, eta=0.0, mask=None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != image_shape:
      raise ValueError(
        f"images must be uint8 [B, {', '.join(map(str, image_shape))}] for this model, got "
        f"{images.dtype} {list(images.shape)}"
      )
    b = images.shape[0]
    if labels is None:
      labels = np.full((b,), nc if nc is not None else 0)
    labels = np.asarray(labels)
    if labels.shape != (b,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be int [B]=[{b}], got {labels.dtype} {list(labels.shape)}")
    if nc is not None and (labels.min() < 0 or labels.max() > nc):
      raise ValueError(
        f"labels must be in [0, {nc}] ({nc} = no class), got range [{labels.min()}, {labels.max()}]"
      )
    check_strength(strength)
    if sampler == "ddim":
      check_num_steps(num_steps, schedule.num_timesteps)
    if mask is not None:
      mask = np.asarray(mask, np.float32)
      if mask.shape != (b, *image_shape[:2], 1):
        raise ValueError(f"mask must be [B, H, W, 1]={[b, *image_shape[:2], 1]}, got {list(mask.shape)}")
      mask = jnp.asarray(mask)
    out = run(
      params,
      key,
      jnp.asarray(to_model_range(images)),
      jnp.asarray(labels, jnp.int32),
      jnp.asarray(strength, jnp.float32),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(eta, jnp.float32),
      mask,
    )
    return to_uint8(np.asarray(jax.device_get(out)))

  return edit
