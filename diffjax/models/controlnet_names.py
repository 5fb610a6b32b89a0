"""diffusers ``ControlNetModel`` configs and state dicts onto :class:`~diffjax.models.controlnet.ControlNet`.

The weights follow the renaming of :mod:`diffjax.models.diffusers_names`
(``controlnet_cond_embedding.blocks.3.weight`` -> ``controlnet_cond_embedding/blocks_3/kernel``,
``controlnet_down_blocks.4.weight`` -> ``controlnet_down_blocks_4/kernel``, convolutions transposed to
HWIO). The config shares the U-Net options of ``UNet2DConditionModel`` (checked by
:func:`~diffjax.models.unet_condition_names.unet_condition_kwargs`) plus the ControlNet's own, so an
SD 1.x ControlNet imports as::

    module = ControlNet(**controlnet_kwargs(diffusers_controlnet.config))
    params = controlnet_params(diffusers_controlnet.state_dict(), module=module, sample_shape=(64, 64))

No torch import here: pass NumPy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.models.controlnet import ControlNet
from diffjax.models.diffusers_names import diffusers_to_flax_params
from diffjax.models.unet_condition_names import unet_condition_kwargs

__all__ = ["controlnet_kwargs", "controlnet_params"]

_UP_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# ControlNetModel options and the only values this port implements.
_REQUIRED = {
  "controlnet_conditioning_channel_order": ("rgb",),
  "global_pool_conditions": (False,),
}


def controlnet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """:class:`ControlNet` keyword arguments for a diffusers ``ControlNetModel`` config.

  Args:
      config: The model's ``config`` mapping (diffusers keys, e.g. from ``controlnet/config.json``).

  Returns:
      Keyword arguments: those of :func:`unet_condition_kwargs` without ``out_channels``, plus
      ``conditioning_channels`` and ``conditioning_embedding_out_channels``.

  Raises:
      ValueError: Listing every unsupported option.
  """
  problems = [
    f"{k}={config[k]!r} (supported: {v})"
    for k, v in _REQUIRED.items()
    if k in config and config[k] is not None and config[k] not in v
  ]
  down = tuple(config.get("down_block_types", ()))
  unknown = [t for t in down if t not in _UP_OF]
  if unknown:
    problems.append(f"down_block_types {down} (supported: {sorted(_UP_OF)})")
  if problems:
    raise ValueError("unsupported ControlNetModel config:\n" + "\n".join(problems))
  # ControlNetModel has the U-Net's encoder options; give the U-Net checker a mirrored decoder.
  unet_config = {
    **config,
    "up_block_types": tuple(_UP_OF[t] for t in reversed(down)),
    "out_channels": config.get("in_channels", 4),
  }
  kwargs = unet_condition_kwargs(unet_config)
  del kwargs["out_channels"]
  kwargs["conditioning_channels"] = int(config.get("conditioning_channels", 3))
  kwargs["conditioning_embedding_out_channels"] = tuple(
    int(c) for c in (config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
  )
  return kwargs


def controlnet_params(
  state_dict: Mapping[str, Any],
  *,
  module: ControlNet,
  sample_shape: tuple[int, int] = (8, 8),
  context_dim: int | None = None,
  context_length: int = 4,
) -> dict:
  """Converts a ``ControlNetModel`` state dict to ``module``'s parameter tree, checked leaf by leaf.

  Args:
      state_dict: ``{key: tensor}`` (``controlnet.state_dict()``; NumPy arrays or torch tensors).
      module: The target module (e.g. ``ControlNet(**controlnet_kwargs(config))``).
      sample_shape: ``(H, W)`` of ``x`` used to trace the parameter shapes (divisible by the U-Net's
          downsampling factor); the conditioning image is traced at ``module.conditioning_factor`` times it.
      context_dim: Width of the context; ``None`` reads it from the first ``attn2.to_k`` weight.
      context_length: Context length used for tracing (any).

  Returns:
      Nested ``dict`` of float32 NumPy arrays, usable as ``{"params": tree}``.

  Raises:
      ValueError: Listing missing, unexpected or mis-shaped tensors.
  """
  if context_dim is None:
    keys = [k for k in state_dict if k.endswith("attn2.to_k.weight")]
    if not keys:
      raise ValueError("no cross-attention weights (attn2.to_k) in the state dict; pass context_dim")
    context_dim = int(state_dict[keys[0]].shape[1])
  f = module.conditioning_factor
  x = jnp.zeros((1, *sample_shape, module.in_channels), jnp.float32)
  img = jnp.zeros((1, sample_shape[0] * f, sample_shape[1] * f, module.conditioning_channels), jnp.float32)
  ctx = jnp.zeros((1, context_length, context_dim), jnp.float32)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)), ctx, img))["params"]
  return diffusers_to_flax_params(state_dict, template=template)
