"""Stable-Diffusion-format (diffusers) model directories: import without torch, export, and sampling.

* :mod:`~diffjax.pretrained.loader`: ``load_pipeline(dir)`` and per-model loaders (``UNet2DConditionModel``,
  ``UNet2DModel``, ``AutoencoderKL``, transformers' ``CLIPTextModel``); safetensors only, checked by name.
* :mod:`~diffjax.pretrained.scheduler`: scheduler configs as diffjax schedules and DDIM timestep tables,
  equal to diffusers' ``DDIMScheduler``.
* :mod:`~diffjax.pretrained.pipeline`: jitted text-to-image and SDEdit img2img with classifier-free guidance.
* :mod:`~diffjax.pretrained.controlnet`: ``ControlNetModel`` folders and the controlled denoiser.
* :mod:`~diffjax.pretrained.prompt_to_prompt`: prompt-to-prompt editing (Hertz et al. 2022) of the pipeline.
* :mod:`~diffjax.pretrained.export`: diffjax models written in the same format (diffusers opens them).

Command line: ``python -m diffjax sample --pretrained DIR --prompt ...`` (:mod:`diffjax.cli_pretrained`).
"""

from diffjax.pretrained.export import save_pipeline, save_unet, save_unet2d, save_unet2d_pipeline, save_vae
from diffjax.pretrained.loader import (
  LoadedModel,
  StableDiffusion,
  load_pipeline,
  load_text_encoder,
  load_unet,
  load_unet2d,
  load_vae,
)
from diffjax.pretrained.pipeline import (
  encode_prompts,
  make_image_to_image,
  make_text_to_image,
  make_unet_fn,
  pipeline_params,
)
from diffjax.pretrained.prompt_to_prompt import make_prompt_to_prompt
from diffjax.pretrained.scheduler import SchedulerConfig, scheduler_from_config

__all__ = [
  "LoadedModel",
  "SchedulerConfig",
  "StableDiffusion",
  "encode_prompts",
  "load_pipeline",
  "load_text_encoder",
  "load_unet",
  "load_unet2d",
  "load_vae",
  "make_image_to_image",
  "make_prompt_to_prompt",
  "make_text_to_image",
  "make_unet_fn",
  "pipeline_params",
  "save_pipeline",
  "save_unet",
  "save_unet2d",
  "save_unet2d_pipeline",
  "save_vae",
  "scheduler_from_config",
]
