"""ControlNet on imported Stable-Diffusion pipelines: diffusers ``ControlNetModel`` folders in and out.

A ControlNet (Zhang, Rao & Agrawala 2023) folder holds ``config.json`` (the U-Net encoder's options plus
``conditioning_channels`` and ``conditioning_embedding_out_channels``) and
``diffusion_pytorch_model.safetensors``; it imports as :class:`~diffjax.models.controlnet.ControlNet`
(config checks in :func:`~diffjax.models.controlnet_names.controlnet_kwargs`, tensors by
:mod:`diffjax.pretrained.state_dicts`). :func:`controlled_unet_fn` is the denoiser of diffusers'
``StableDiffusionControlNetPipeline``: the ControlNet reads the noisy latents, the timestep, the text
context and the conditioning image (RGB in ``[0, 1]``, at image resolution) and its scaled residuals are
added to the U-Net's skip connections and middle block.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from diffjax.models.controlnet import ControlNet
from diffjax.models.controlnet_names import controlnet_kwargs
from diffjax.models.unet_condition import UNetCondition
from diffjax.pretrained.configs import DIFFUSERS_VERSION, unet_condition_config
from diffjax.pretrained.files import (
  DIFFUSERS_WEIGHTS,
  read_json,
  read_safetensors,
  weights_files,
  write_model,
)
from diffjax.pretrained.loader import LoadedModel, init_shapes
from diffjax.pretrained.state_dicts import to_params, to_state_dict

__all__ = ["controlled_unet_fn", "controlnet_config", "load_controlnet", "save_controlnet"]


def load_controlnet(path: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads a diffusers ``ControlNetModel`` folder.

  Args:
      path: The folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).
      variant: Weights variant (e.g. ``"fp16"``), or ``None``.
      dtype: Compute dtype (parameters stay float32).

  Returns:
      The :class:`~diffjax.models.controlnet.ControlNet`, its parameters and config.

  Raises:
      FileNotFoundError: If the config or weights are missing.
      ValueError: On an unsupported config value, pickle-only weights or missing / unexpected /
          mis-shaped tensors (named).
  """
  path = Path(path)
  config = read_json(path / "config.json", what="ControlNetModel config")
  if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
    raise ValueError(f"'{path / 'config.json'}' describes a {config['_class_name']}, not a ControlNetModel")
  try:
    module = ControlNet(**controlnet_kwargs(config)).clone(dtype=dtype)
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{path / 'config.json'}: {err}") from err
  dim = config.get("cross_attention_dim", 1280)
  if not isinstance(dim, int):
    raise ValueError(f"{path / 'config.json'}: cross_attention_dim={dim!r} is not supported (one int)")  # noqa: TRY004
  f, g = 2 ** (len(tuple(module.block_out_channels)) - 1), module.conditioning_factor
  f32 = "float32"
  template = init_shapes(
    module,
    ((1, f, f, module.in_channels), f32),
    ((1,), f32),
    ((1, 1, dim), f32),
    ((1, f * g, f * g, module.conditioning_channels), f32),
  )
  files = weights_files(path, stem=DIFFUSERS_WEIGHTS, variant=variant)
  what = f"ControlNetModel weights {', '.join(str(p) for p in files)}"
  params = to_params(read_safetensors(files), template=template, what=what)
  return LoadedModel(module=module, params=params, config=config)


def controlnet_config(module: ControlNet, *, cross_attention_dim: int) -> dict[str, Any]:
  """The diffusers ``ControlNetModel`` config of a :class:`~diffjax.models.controlnet.ControlNet`."""
  fields = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_levels",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "position_embedding",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
  )
  base = UNetCondition(out_channels=module.in_channels, **{k: getattr(module, k) for k in fields})
  unet = unet_condition_config(base, cross_attention_dim=cross_attention_dim)
  for key in ("up_block_types", "out_channels", "sample_size", "dropout"):
    unet.pop(key, None)
  return {
    **unet,
    "_class_name": "ControlNetModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "conditioning_channels": module.conditioning_channels,
    "conditioning_embedding_out_channels": [int(c) for c in module.conditioning_embedding_out_channels],
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
  }


def save_controlnet(
  directory: str | os.PathLike,
  *,
  module: ControlNet,
  params: Any,
  config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a ControlNet as a diffusers ``ControlNetModel`` folder.

  Args:
      directory: The folder (created).
      module: The ControlNet.
      params: Its parameter tree.
      config: Write this config instead (e.g. the imported one).

  Returns:
      The weights file.
  """
  if config is None:
    flat = traverse_util.flatten_dict(params)
    dims = {int(v.shape[0]) for k, v in flat.items() if k[-3:] == ("attn2", "to_k", "kernel")}
    if len(dims) != 1:
      raise ValueError(
        f"cannot read the context width from the ControlNet's attn2/to_k kernels ({sorted(dims)})"
      )
    config = controlnet_config(module, cross_attention_dim=dims.pop())
  return write_model(directory, config=config, tensors=to_state_dict(params), stem=DIFFUSERS_WEIGHTS)


def controlled_unet_fn(unet: UNetCondition, controlnet: ControlNet) -> Callable:
  """``model_fn(params, z_t, t, cond)`` of a U-Net steered by a ControlNet.

  ``params`` holds ``"unet"`` and ``"controlnet"`` trees; ``cond = (context [B, L, D], image [B, H, W, 3]
  in [0, 1], conditioning_scale [B])``. As in diffusers' ControlNet pipeline, the image is used as is (no
  normalisation to ``[-1, 1]``) and every residual is multiplied by the scale. ``attention_control``
  (:mod:`diffjax.models.attention_control`) reaches the U-Net's attention layers only.
  """

  def model_fn(params, z, t, cond, *, attention_control=None):
    context, image, scale = cond
    down, mid = controlnet.apply(
      {"params": params["controlnet"]}, z, t, context, image, conditioning_scale=scale
    )
    return unet.apply(
      {"params": params["unet"]},
      z,
      t,
      context,
      down_block_additional_residuals=down,
      mid_block_additional_residual=mid,
      attention_control=attention_control,
    )

  return model_fn
