"""diffusers ``UNet2DConditionModel`` configs and state dicts onto :class:`~diffjax.models.UNetCondition`.

Weights convert by the rules of :mod:`diffjax.models.diffusers_names` (a renaming plus transposes):
``down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight`` becomes
``down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel`` (transposed ``[in, out]``), 1x1
``proj_in``/``proj_out`` convolutions become ``[1, 1, in, out]`` kernels, LayerNorm and GroupNorm weights
become ``scale``. Configs convert by :func:`unet_condition_kwargs`, which refuses the
``UNet2DConditionModel`` options this port does not implement (SDXL's added time/text embeddings,
class embeddings, dual cross-attention, ...) with a message naming them, so a Stable-Diffusion 1.x or 2.x
U-Net imports as::

    kwargs = unet_condition_kwargs(diffusers_unet.config)
    module = UNetCondition(**kwargs)
    params = unet_condition_params(diffusers_unet.state_dict(), module=module, sample_shape=(64, 64),
                                   context_dim=768)

No torch import here: pass NumPy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.models.diffusers_names import diffusers_to_flax_params
from diffjax.models.unet_condition import UNetCondition

__all__ = ["unet_condition_kwargs", "unet_condition_params"]

_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# Options of UNet2DConditionModel and the only values this port implements.
_REQUIRED = {
  "mid_block_type": ("UNetMidBlock2DCrossAttn",),
  "act_fn": ("silu",),
  "time_embedding_type": ("positional",),
  "resnet_time_scale_shift": ("default",),
  "attention_type": ("default",),
  "center_input_sample": (False,),
  "only_cross_attention": (False,),
  "dual_cross_attention": (False,),
  "resnet_skip_time_act": (False,),
  "conv_in_kernel": (3,),
  "conv_out_kernel": (3,),
  "downsample_padding": (1,),
  "mid_block_scale_factor": (1, 1.0),
  "resnet_out_scale_factor": (1, 1.0),
}
# Options that must be absent (None): extra embeddings and projections.
_ABSENT = (
  "class_embed_type",
  "num_class_embeds",
  "addition_embed_type",
  "encoder_hid_dim",
  "encoder_hid_dim_type",
  "time_cond_proj_dim",
  "time_embedding_dim",
  "time_embedding_act_fn",
  "timestep_post_act",
  "cross_attention_norm",
  "reverse_transformer_layers_per_block",
  "mid_block_only_cross_attention",
)


def _seq(value: Any, levels: int) -> tuple:
  return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * levels


def unet_condition_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """:class:`UNetCondition` keyword arguments for a diffusers ``UNet2DConditionModel`` config.

  Args:
      config: The model's ``config`` (a mapping with diffusers' keys, e.g. from ``unet/config.json``).

  Returns:
      Keyword arguments: ``in_channels``, ``out_channels``, ``block_out_channels``, ``layers_per_block``,
      ``cross_attention_levels``, ``num_attention_heads`` (diffusers' ``num_attention_heads``, or its
      ``attention_head_dim`` which ``UNet2DConditionModel`` uses as the head count when the former is
      unset), ``transformer_layers_per_block``, ``use_linear_projection``, ``norm_num_groups``,
      ``norm_eps``, ``flip_sin_to_cos``, ``freq_shift``.

  Raises:
      ValueError: Listing every unsupported option or inconsistent block type.
  """
  problems = []
  for key, allowed in _REQUIRED.items():
    if key in config and config[key] is not None and config[key] not in allowed:
      problems.append(f"{key}={config[key]!r} (supported: {allowed})")
  problems += [f"{key}={config[key]!r} (must be None)" for key in _ABSENT if config.get(key) is not None]
  chans = tuple(int(c) for c in config["block_out_channels"])
  levels = len(chans)
  down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
  if any(t not in _DOWN for t in down) or any(t not in _UP for t in up):
    problems.append(f"block types {down} / {up} (supported: {sorted(_DOWN)} / {sorted(_UP)})")
  elif len(down) != levels or [_DOWN[t] for t in down] != [_UP[t] for t in reversed(up)]:
    problems.append(f"up_block_types {up} do not mirror down_block_types {down}")
  layers = config.get("layers_per_block", 2)
  if not isinstance(layers, int):
    problems.append(f"per-level layers_per_block={layers!r} (supported: one int)")
  if problems:
    raise ValueError("unsupported UNet2DConditionModel config:\n" + "\n".join(problems))
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  return {
    "in_channels": int(config.get("in_channels", 4)),
    "out_channels": int(config.get("out_channels", 4)),
    "block_out_channels": chans,
    "layers_per_block": int(layers),
    "cross_attention_levels": tuple(_DOWN[t] for t in down),
    "num_attention_heads": tuple(int(h) for h in _seq(heads, levels)),
    "transformer_layers_per_block": tuple(
      int(n) for n in _seq(config.get("transformer_layers_per_block", 1), levels)
    ),
    "use_linear_projection": bool(config.get("use_linear_projection", False)),
    "norm_num_groups": int(config.get("norm_num_groups", 32)),
    "norm_eps": float(config.get("norm_eps", 1e-5)),
    "dropout": float(config.get("dropout", 0.0)),
    "flip_sin_to_cos": bool(config.get("flip_sin_to_cos", True)),
    "freq_shift": float(config.get("freq_shift", 0)),
  }


def unet_condition_params(
  state_dict: Mapping[str, Any],
  *,
  module: UNetCondition,
  sample_shape: tuple[int, int] = (8, 8),
  context_dim: int | None = None,
  context_length: int = 4,
) -> dict:
  """Converts a ``UNet2DConditionModel`` state dict to ``module``'s parameter tree, checked leaf by leaf.

  Args:
      state_dict: ``{key: tensor}`` (``unet.state_dict()``; NumPy arrays or torch tensors).
      module: The target module (e.g. ``UNetCondition(**unet_condition_kwargs(config))``).
      sample_shape: ``(H, W)`` used to trace the module's parameter shapes (any size divisible by
          :attr:`UNetCondition.downsample_factor`).
      context_dim: Width ``D`` of the context (diffusers ``cross_attention_dim``); ``None`` reads it from
          the first cross-attention ``to_k`` weight.
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
  x = jnp.zeros((1, *sample_shape, module.in_channels), jnp.float32)
  ctx = jnp.zeros((1, context_length, context_dim), jnp.float32)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)), ctx))["params"]
  return diffusers_to_flax_params(state_dict, template=template)
