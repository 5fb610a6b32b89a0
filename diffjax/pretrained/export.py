"""Writing diffjax models in the diffusers / transformers directory format, so that diffusers opens them.

Each model folder gets ``config.json`` and its weights under PyTorch names and layouts
(:func:`diffjax.pretrained.state_dicts.to_state_dict`) in ``diffusion_pytorch_model.safetensors``
(diffusers) or ``model.safetensors`` (transformers). :func:`save_pipeline` writes a whole
Stable-Diffusion pipeline directory (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``controlnet/``) that ``StableDiffusionPipeline.from_pretrained`` and
:func:`diffjax.pretrained.loader.load_pipeline` both read. The conversion is transposes and renames
only: export then import gives back the same parameters bit for bit.

Typical use, a diffjax-trained latent text-to-image U-Net and its autoencoder::

    save_unet("out/unet", module=unet, params=params, cross_attention_dim=384)
    save_vae("out/vae", module=codec.module, params=codec.params, scaling_factor=codec.scaling_factor)
    # diffusers: UNet2DConditionModel.from_pretrained("out/unet"), AutoencoderKL.from_pretrained("out/vae")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import traverse_util

from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.clip_text import CLIPTextModel, clip_text_config
from diffjax.models.unet import UNet
from diffjax.models.unet_condition import UNetCondition
from diffjax.pretrained.configs import (
  DIFFUSERS_VERSION,
  autoencoder_config,
  unet2d_config,
  unet_condition_config,
)
from diffjax.pretrained.files import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, write_json, write_model
from diffjax.pretrained.loader import StableDiffusion
from diffjax.pretrained.state_dicts import to_state_dict

__all__ = [
  "save_pipeline",
  "save_text_encoder",
  "save_unet",
  "save_unet2d",
  "save_unet2d_pipeline",
  "save_vae",
  "scheduler_config",
]

_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(
  kind: str, *, num_timesteps: int, prediction: str = "eps", clip_sample: bool = True
) -> dict[str, Any]:
  """A diffusers ``DDIMScheduler`` config with the schedule of :func:`diffjax.schedules.make_schedule`.

  ``linear`` (diffjax rescales DDPM's 1e-4 .. 0.02 by ``1000 / T``), ``cosine`` (``squaredcos_cap_v2``,
  the same formula) and ``scaled_linear`` (0.00085 .. 0.012) with diffjax's default betas; timesteps
  ``leading`` with no offset and a final alpha-bar of 1, which are diffjax's ``uniform`` DDIM timesteps
  whenever the step count divides ``T``.

  Raises:
      ValueError: On an unknown kind or prediction.
  """
  if prediction not in _PREDICTION_TYPES:
    raise ValueError(f"prediction={prediction!r} is not one of {tuple(_PREDICTION_TYPES)}")
  T = int(num_timesteps)
  betas = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4 * 1000 / T, "beta_end": 0.02 * 1000 / T},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
  }
  if kind not in betas:
    raise ValueError(f"kind={kind!r} is not one of {tuple(betas)}")
  return {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": T,
    **betas[kind],
    "prediction_type": _PREDICTION_TYPES[prediction],
    "clip_sample": bool(clip_sample),
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
  }


def _context_dim(params: Any) -> int:
  flat = traverse_util.flatten_dict(params)
  dims = {int(v.shape[0]) for k, v in flat.items() if k[-3:] == ("attn2", "to_k", "kernel")}
  if len(dims) != 1:
    raise ValueError(
      f"cannot read the context width from the U-Net's attn2/to_k kernels (found {sorted(dims)})"
    )
  return dims.pop()


def save_unet(
  directory: str | os.PathLike,
  *,
  module: UNetCondition,
  params: Any,
  cross_attention_dim: int | None = None,
  sample_size: int | None = None,
  config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a :class:`~diffjax.models.unet_condition.UNetCondition` as a ``UNet2DConditionModel`` folder.

  Args:
      directory: The folder (created).
      module: The U-Net.
      params: Its parameter tree.
      cross_attention_dim: Context width; default read from the ``attn2/to_k`` kernels.
      sample_size: Latent size to record in the config.
      config: Write this config instead (e.g. the one an imported model came with).

  Returns:
      The weights file.

  Raises:
      ValueError: If the module has an option diffusers lacks (see :mod:`diffjax.pretrained.configs`).
  """
  if config is None:
    dim = cross_attention_dim if cross_attention_dim is not None else _context_dim(params)
    config = unet_condition_config(module, cross_attention_dim=dim, sample_size=sample_size)
  return write_model(directory, config=config, tensors=to_state_dict(params), stem=DIFFUSERS_WEIGHTS)


def save_unet2d(
  directory: str | os.PathLike,
  *,
  module: UNet,
  params: Any,
  sample_size: int | None = None,
  config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a :class:`~diffjax.models.UNet` as a ``UNet2DModel`` folder (arguments as :func:`save_unet`)."""
  config = config if config is not None else unet2d_config(module, sample_size=sample_size)
  return write_model(directory, config=config, tensors=to_state_dict(params), stem=DIFFUSERS_WEIGHTS)


def save_unet2d_pipeline(
  directory: str | os.PathLike,
  *,
  module: UNet,
  params: Any,
  schedule: str,
  num_timesteps: int,
  prediction: str = "eps",
  sample_size: int | None = None,
) -> Path:
  """Writes a diffjax pixel U-Net and its schedule as a diffusers ``DDIMPipeline`` directory.

  ``unet/`` (``UNet2DModel``), ``scheduler/`` (:func:`scheduler_config`) and ``model_index.json``; a
  class-conditional U-Net keeps its null class as the last class embedding (``num_class_embeds =
  num_classes + 1``) for classifier-free guidance.

  Returns:
      The directory.
  """
  directory = Path(directory)
  save_unet2d(directory / "unet", module=module, params=params, sample_size=sample_size)
  (directory / "scheduler").mkdir(parents=True, exist_ok=True)
  config = scheduler_config(schedule, num_timesteps=num_timesteps, prediction=prediction)
  write_json(directory / "scheduler" / "scheduler_config.json", config)
  index = {
    "_class_name": "DDIMPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNet2DModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
  }
  write_json(directory / "model_index.json", index)
  return directory


def save_vae(
  directory: str | os.PathLike,
  *,
  module: AutoencoderKL,
  params: Any,
  scaling_factor: float = 1.0,
  shift_factor: float | None = None,
  sample_size: int | None = None,
  config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a :class:`~diffjax.models.AutoencoderKL` as an ``AutoencoderKL`` folder.

  Args:
      directory: The folder (created).
      module: The autoencoder.
      params: Its parameter tree.
      scaling_factor: Latent scaling factor recorded in the config (one float; a per-channel codec has no
          diffusers equivalent).
      shift_factor: Latent shift, or ``None``.
      sample_size: Image size to record.
      config: Write this config instead.

  Returns:
      The weights file.
  """
  if config is None:
    if not isinstance(scaling_factor, int | float):
      raise ValueError(f"scaling_factor must be one number for diffusers, got {scaling_factor!r}")
    config = autoencoder_config(
      module, scaling_factor=scaling_factor, shift_factor=shift_factor, sample_size=sample_size
    )
  return write_model(directory, config=config, tensors=to_state_dict(params), stem=DIFFUSERS_WEIGHTS)


def save_text_encoder(
  directory: str | os.PathLike,
  *,
  module: CLIPTextModel,
  params: Any,
  config: Mapping[str, Any] | None = None,
) -> Path:
  """Writes a :class:`~diffjax.models.clip_text.CLIPTextModel` as a transformers ``CLIPTextModel`` folder.

  Tensor names are those transformers 5 writes (no ``text_model.`` prefix).
  """
  config = config if config is not None else clip_text_config(module)
  return write_model(directory, config=config, tensors=to_state_dict(params), stem=TRANSFORMERS_WEIGHTS)


def save_pipeline(
  sd: StableDiffusion, directory: str | os.PathLike, *, params: Mapping[str, Any] | None = None
) -> Path:
  """Writes a whole Stable-Diffusion pipeline directory.

  Args:
      sd: The pipeline (e.g. from :func:`~diffjax.pretrained.loader.load_pipeline`); its configs are
          written as they were read.
      directory: The output directory (created).
      params: ``{"unet", "vae", "text_encoder"[, "controlnet"]}`` trees to write instead of ``sd``'s own
          (e.g. after fine-tuning).

  Returns:
      The directory.
  """
  directory = Path(directory)
  params = dict(params or {})
  save_unet(
    directory / "unet",
    module=sd.unet.module,
    params=params.get("unet", sd.unet.params),
    config=sd.unet.config,
  )
  save_vae(
    directory / "vae", module=sd.vae.module, params=params.get("vae", sd.vae.params), config=sd.vae.config
  )
  save_text_encoder(
    directory / "text_encoder",
    module=sd.text_encoder.module,
    params=params.get("text_encoder", sd.text_encoder.params),
    config=sd.text_encoder.config,
  )
  sd.tokenizer.save_directory(directory / "tokenizer")
  (directory / "scheduler").mkdir(parents=True, exist_ok=True)
  write_json(directory / "scheduler" / "scheduler_config.json", sd.scheduler.config)
  index = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", sd.scheduler.config.get("_class_name", "DDIMScheduler")],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
  }
  if sd.controlnet is not None:
    from diffjax.pretrained.controlnet import save_controlnet

    save_controlnet(
      directory / "controlnet",
      module=sd.controlnet.module,
      params=params.get("controlnet", sd.controlnet.params),
      config=sd.controlnet.config,
    )
    index["_class_name"] = "StableDiffusionControlNetPipeline"
    index["controlnet"] = ["diffusers", "ControlNetModel"]
  write_json(directory / "model_index.json", index)
  return directory
