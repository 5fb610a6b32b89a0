"""diffusers ``config.json`` <-> diffjax module keyword arguments, both ways.

Imports: ``UNet2DConditionModel`` (:func:`diffjax.models.unet_condition_names.unet_condition_kwargs`),
``AutoencoderKL`` (:func:`diffjax.models.autoencoder_names.autoencoder_kwargs_from_diffusers_config`),
``CLIPTextModel`` (:func:`diffjax.models.clip_text.clip_text_kwargs`) and ``UNet2DModel``
(:func:`unet2d_kwargs`, here). Exports: the inverse maps, which write configs that diffusers'
``from_pretrained`` accepts and that import back to the same module. A module option diffusers cannot
express (e.g. diffjax's fixed position embedding in the transformers, or the guidance embedding of a
distilled student) is refused on export by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.unet import UNet
from diffjax.models.unet_condition import UNetCondition

__all__ = ["autoencoder_config", "unet2d_config", "unet2d_kwargs", "unet_condition_config"]

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these configs were checked against
_DOWN2D = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP2D = {"UpBlock2D": False, "AttnUpBlock2D": True}
_UNET2D_REQUIRED = {
  "center_input_sample": (False,),
  "time_embedding_type": ("positional",),
  "mid_block_type": ("UNetMidBlock2D",),
  "downsample_padding": (1,),
  "downsample_type": ("conv",),
  "upsample_type": ("conv",),
  "act_fn": ("silu",),
  "resnet_time_scale_shift": ("default",),
  "add_attention": (True,),
  "mid_block_scale_factor": (1, 1.0),
}
_UNET2D_ABSENT = ("class_embed_type", "time_embedding_dim", "attn_norm_num_groups")


def _listed(value: Any) -> list:
  return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def unet2d_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """:class:`~diffjax.models.UNet` keyword arguments for a diffusers ``UNet2DModel`` config.

  ``num_class_embeds = N`` becomes ``num_classes = N - 1``: diffjax's class table has a null class at index
  ``num_classes`` (for classifier-free guidance), so the table keeps its ``N`` rows.

  Raises:
      ValueError: Listing every unsupported option or inconsistent block type.
  """
  problems = []
  for key, allowed in _UNET2D_REQUIRED.items():
    if config.get(key) is not None and config[key] not in allowed:
      problems.append(f"{key}={config[key]!r} (supported: {allowed})")
  problems += [
    f"{key}={config[key]!r} (must be None)" for key in _UNET2D_ABSENT if config.get(key) is not None
  ]
  chans = tuple(int(c) for c in config.get("block_out_channels", (224, 448, 672, 896)))
  down = tuple(config.get("down_block_types", ()))
  up = tuple(config.get("up_block_types", ()))
  if any(t not in _DOWN2D for t in down) or any(t not in _UP2D for t in up):
    problems.append(f"block types {down} / {up} (supported: {sorted(_DOWN2D)} / {sorted(_UP2D)})")
  elif len(down) != len(chans) or [_DOWN2D[t] for t in down] != [_UP2D[t] for t in reversed(up)]:
    problems.append(f"up_block_types {up} do not mirror down_block_types {down}")
  head_dim = config.get("attention_head_dim", 8)
  if not isinstance(head_dim, int):
    problems.append(f"attention_head_dim={head_dim!r} (supported: one int, channels per head)")
  if problems:
    raise ValueError("unsupported UNet2DModel config:\n" + "\n".join(problems))
  n_cls = config.get("num_class_embeds")
  return {
    "in_channels": int(config.get("in_channels", 3)),
    "out_channels": int(config.get("out_channels", 3)),
    "block_out_channels": chans,
    "layers_per_block": int(config.get("layers_per_block", 2)),
    "attention_levels": tuple(_DOWN2D[t] for t in down),
    "attention_head_dim": int(head_dim),
    "norm_num_groups": int(config.get("norm_num_groups", 32)),
    "norm_eps": float(config.get("norm_eps", 1e-5)),
    "dropout": float(config.get("dropout", 0.0)),
    "num_classes": None if n_cls is None else int(n_cls) - 1,
    "flip_sin_to_cos": bool(config.get("flip_sin_to_cos", True)),
    "freq_shift": float(config.get("freq_shift", 0)),
  }


def unet2d_config(module: UNet, *, sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers ``UNet2DModel`` config of a diffjax :class:`~diffjax.models.UNet`.

  Raises:
      ValueError: If the module has a guidance embedding (not a ``UNet2DModel`` option).
  """
  if module.guidance_embedding:
    raise ValueError(
      "a UNet with guidance_embedding=True has no UNet2DModel equivalent; it cannot be exported"
    )
  levels = tuple(bool(a) for a in module.attention_levels)
  return {
    "_class_name": "UNet2DModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    **({} if sample_size is None else {"sample_size": int(sample_size)}),
    "in_channels": module.in_channels,
    "out_channels": module.out_channels,
    "block_out_channels": [int(c) for c in module.block_out_channels],
    "layers_per_block": module.layers_per_block,
    "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
    "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
    "attention_head_dim": module.attention_head_dim,
    "norm_num_groups": module.norm_num_groups,
    "norm_eps": module.norm_eps,
    "num_class_embeds": None if module.num_classes is None else module.num_classes + 1,
    "flip_sin_to_cos": module.flip_sin_to_cos,
    "freq_shift": int(module.freq_shift) if float(module.freq_shift).is_integer() else module.freq_shift,
    "dropout": module.dropout,
  }


def unet_condition_config(
  module: UNetCondition, *, cross_attention_dim: int, sample_size: int | None = None
) -> dict[str, Any]:
  """The diffusers ``UNet2DConditionModel`` config of a :class:`~diffjax.models.unet_condition.UNetCondition`.

  Args:
      module: The U-Net.
      cross_attention_dim: Width ``D`` of its context (the text encoder's hidden size).
      sample_size: Latent size to record (diffusers' default image size is ``sample_size * vae_factor``).

  Raises:
      ValueError: If ``position_embedding`` is on (diffusers' transformers have none).
  """
  if module.position_embedding:
    raise ValueError(
      "a UNetCondition with position_embedding=True has no UNet2DConditionModel equivalent; it cannot be exported"
    )
  levels = tuple(bool(a) for a in module.cross_attention_levels)
  return {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    **({} if sample_size is None else {"sample_size": int(sample_size)}),
    "in_channels": module.in_channels,
    "out_channels": module.out_channels,
    "block_out_channels": [int(c) for c in module.block_out_channels],
    "layers_per_block": module.layers_per_block,
    "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels],
    "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    # UNet2DConditionModel reads attention_head_dim as the number of heads (num_attention_heads must be None).
    "attention_head_dim": _listed(module.num_attention_heads),
    "transformer_layers_per_block": _listed(module.transformer_layers_per_block),
    "cross_attention_dim": int(cross_attention_dim),
    "use_linear_projection": module.use_linear_projection,
    "norm_num_groups": module.norm_num_groups,
    "norm_eps": module.norm_eps,
    "flip_sin_to_cos": module.flip_sin_to_cos,
    "freq_shift": int(module.freq_shift) if float(module.freq_shift).is_integer() else module.freq_shift,
    "dropout": module.dropout,
  }


def autoencoder_config(
  module: AutoencoderKL,
  *,
  scaling_factor: float,
  shift_factor: float | None = None,
  sample_size: int | None = None,
) -> dict[str, Any]:
  """The diffusers ``AutoencoderKL`` config of a :class:`~diffjax.models.AutoencoderKL`.

  Args:
      module: The autoencoder.
      scaling_factor: Latent scaling factor (0.18215 for SD 1.x/2.x's VAE).
      shift_factor: Latent shift (``None`` for SD 1.x/2.x).
      sample_size: Image size to record.
  """
  n = len(tuple(module.block_out_channels))
  return {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": DIFFUSERS_VERSION,
    **({} if sample_size is None else {"sample_size": int(sample_size)}),
    "in_channels": module.in_channels,
    "out_channels": module.out_channels,
    "block_out_channels": [int(c) for c in module.block_out_channels],
    "down_block_types": ["DownEncoderBlock2D"] * n,
    "up_block_types": ["UpDecoderBlock2D"] * n,
    "layers_per_block": module.layers_per_block,
    "latent_channels": module.latent_channels,
    "norm_num_groups": module.norm_num_groups,
    "act_fn": "silu",
    "mid_block_add_attention": module.mid_block_add_attention,
    "use_quant_conv": module.use_quant_conv,
    "use_post_quant_conv": module.use_post_quant_conv,
    "scaling_factor": float(scaling_factor),
    "shift_factor": None if shift_factor is None else float(shift_factor),
    "force_upcast": True,
  }
