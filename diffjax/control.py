"""A frozen U-Net steered by a ControlNet, as one ``model_fn(params, x_t, t, cond)``.

ControlNet (Zhang, Rao & Agrawala 2023) adds the outputs of a trainable encoder copy to a frozen U-Net's
skip connections and middle block. Wrapped here as the library's one interface, so every sampler
(DDPM, DDIM, DPM-Solver++), classifier-free guidance, the losses and SDEdit work with control unchanged:

* ``params = {"base": unet_params, "controlnet": controlnet_params}``;
* ``cond = {"cond": base_cond, "image": [B, H', W', C_c], "scale": [B]}`` (build it with
  :func:`control_cond`): the base model's own condition (labels, text, or ``None``), the conditioning
  image and the per-sample conditioning scale. Every leaf has the batch axis, so classifier-free guidance
  concatenates the conditional and null conditions as usual; a null condition with ``scale`` 0 gives
  diffusers' guess-mode pipeline behaviour (control on the conditional half only).

Training updates only ``params["controlnet"]`` (see :mod:`diffjax.training.controlnet_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.losses import ModelFn
from diffjax.models.unet import UNet
from diffjax.models.unet_condition import UNetCondition

__all__ = ["control_cond", "controlled_model_fn", "make_controlled_model_fn"]

_KEYS = ("cond", "image", "scale")


def control_cond(cond: Any, image, scale=1.0) -> dict:
  """The condition of a controlled ``model_fn``.

  Args:
      cond: The base model's condition (``[B]`` labels, a ``(context, mask)`` pair, ``None``, ...).
      image: ``[B, H', W', C_c]`` conditioning image (for the ControlNet of the same size as the samples,
          or ``conditioning_factor`` times larger).
      scale: Conditioning scale, a scalar or ``[B]`` (0 disables control for that sample).

  Returns:
      ``{"cond": cond, "image": float32 [B, H', W', C_c], "scale": float32 [B]}``.

  Raises:
      ValueError: Naming ``image`` or ``scale`` when their shapes are wrong.
  """
  image = jnp.asarray(image)
  if image.ndim != 4:
    raise ValueError(f"image must be a [B, H, W, C] conditioning image, got shape {image.shape}")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"image must be floating point (e.g. edges in [0, 1]), got dtype {image.dtype}")
  b = image.shape[0]
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim == 0:
    scale = jnp.full((b,), scale)
  elif scale.shape != (b,):
    raise ValueError(f"scale must be a scalar or shaped [B]=({b},), got shape {scale.shape}")
  return {"cond": cond, "image": image.astype(jnp.float32), "scale": scale}


def controlled_model_fn(*, base_apply: Callable, control_apply: Callable) -> ModelFn:
  """Composes a base U-Net and its ControlNet into one ``model_fn``.

  Args:
      base_apply: ``(base_params, x_t, t, cond, down_residuals, mid_residual) -> prediction``.
      control_apply: ``(controlnet_params, x_t, t, cond, image, scale) -> (down_residuals, mid_residual)``.

  Returns:
      ``model_fn(params, x_t, t, cond)`` with ``params = {"base", "controlnet"}`` and ``cond`` from
      :func:`control_cond`.
  """

  def model_fn(params, x_t, t, cond):
    if not isinstance(cond, dict) or set(cond) != set(_KEYS):
      raise ValueError(f"cond of a controlled model must be a dict with keys {_KEYS} (see control_cond)")
    if not isinstance(params, dict) or set(params) != {"base", "controlnet"}:
      raise ValueError("params of a controlled model must be {'base': ..., 'controlnet': ...}")
    down, mid = control_apply(params["controlnet"], x_t, t, cond["cond"], cond["image"], cond["scale"])
    return base_apply(params["base"], x_t, t, cond["cond"], down, mid)

  return model_fn


def make_controlled_model_fn(
  unet: nn.Module,
  controlnet: nn.Module,
  *,
  guess_mode: bool = False,
  train: bool = False,
  dropout_key: jax.Array | None = None,
) -> ModelFn:
  """:func:`controlled_model_fn` for a diffjax U-Net and its ControlNet.

  Args:
      unet: A :class:`~diffjax.models.UNet` (``cond`` = ``[B]`` labels or ``None``) or
          :class:`~diffjax.models.unet_condition.UNetCondition` (``cond`` = context ``[B, S, D]`` or a
          ``(context, mask)`` pair).
      controlnet: The matching :class:`~diffjax.models.unet_controlnet.UNetControlNet` or
          :class:`~diffjax.models.controlnet.ControlNet`.
      guess_mode: diffusers' guess-mode residual weights.
      train: Enables the ControlNet's dropout (the frozen base always runs in inference mode, as in
          diffusers' ControlNet training).
      dropout_key: The dropout key when ``train``.

  Raises:
      ValueError: If ``unet`` is not one of the two U-Nets.
  """
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None
  if isinstance(unet, UNetCondition):

    def split(cond):
      return (cond[0], cond[1]) if isinstance(cond, (tuple, list)) else (cond, None)

    def base_apply(p, x, t, cond, down, mid):
      ctx, mask = split(cond)
      return unet.apply(
        {"params": p},
        x,
        t,
        ctx,
        mask,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
      )

    def control_apply(p, x, t, cond, image, scale):
      ctx, mask = split(cond)
      return controlnet.apply(
        {"params": p},
        x,
        t,
        ctx,
        image,
        mask,
        conditioning_scale=scale,
        guess_mode=guess_mode,
        train=train,
        rngs=rngs,
      )

  elif isinstance(unet, UNet):

    def base_apply(p, x, t, cond, down, mid):
      return unet.apply(
        {"params": p}, x, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid
      )

    def control_apply(p, x, t, cond, image, scale):
      return controlnet.apply(
        {"params": p},
        x,
        t,
        cond,
        image,
        conditioning_scale=scale,
        guess_mode=guess_mode,
        train=train,
        rngs=rngs,
      )

  else:
    raise ValueError(f"unet must be a UNet or UNetCondition, got {type(unet).__name__}")
  return controlled_model_fn(base_apply=base_apply, control_apply=control_apply)
