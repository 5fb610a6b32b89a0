"""Loading diffusers-format model folders and Stable-Diffusion pipeline directories, without torch.

A pipeline directory (what ``StableDiffusionPipeline.save_pretrained`` writes, e.g. a download of
``stable-diffusion-v1-5``) holds ``model_index.json`` and the folders ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` (and ``controlnet/`` for ControlNet pipelines). Each
model folder's ``config.json`` becomes module keyword arguments (unsupported options refused by name), its
safetensors weights a parameter tree checked tensor by tensor (:mod:`diffjax.pretrained.state_dicts`),
and the tokenizer and scheduler become :class:`~diffjax.models.clip_tokenizer.CLIPTokenizer` and
:class:`~diffjax.pretrained.scheduler.SchedulerConfig`. The safety checker and feature extractor are not
loaded.

Typical use::

    pipe = load_pipeline("stable-diffusion-v1-5")            # float32 NumPy parameters
    unet, params = pipe.unet.module, pipe.unet.params         # UNetCondition and its tree
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.autoencoder_names import autoencoder_kwargs_from_diffusers_config
from diffjax.models.clip_text import CLIPTextModel, clip_text_kwargs
from diffjax.models.clip_tokenizer import CLIPTokenizer
from diffjax.models.unet import UNet
from diffjax.models.unet_condition import UNetCondition
from diffjax.models.unet_condition_names import unet_condition_kwargs
from diffjax.pretrained.configs import unet2d_kwargs
from diffjax.pretrained.files import (
  DIFFUSERS_WEIGHTS,
  TRANSFORMERS_WEIGHTS,
  read_json,
  read_safetensors,
  weights_files,
)
from diffjax.pretrained.scheduler import SchedulerConfig, scheduler_from_config
from diffjax.pretrained.state_dicts import to_params

__all__ = [
  "PIPELINES",
  "LoadedModel",
  "StableDiffusion",
  "init_shapes",
  "load_pipeline",
  "load_text_encoder",
  "load_unet",
  "load_unet2d",
  "load_vae",
]

PIPELINES = (
  "StableDiffusionPipeline",
  "StableDiffusionImg2ImgPipeline",
  "StableDiffusionControlNetPipeline",
  "StableDiffusionControlNetImg2ImgPipeline",
)
# component -> accepted (library, class) entries of model_index.json
_COMPONENTS = {
  "unet": {("diffusers", "UNet2DConditionModel")},
  "vae": {("diffusers", "AutoencoderKL")},
  "text_encoder": {("transformers", "CLIPTextModel")},
  "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
  "controlnet": {("diffusers", "ControlNetModel")},
}
_IGNORED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A module with its parameters and the ``config.json`` it came from.

  Attributes:
      module: The Flax module (built from the config).
      params: Its parameter tree (float32 NumPy arrays; ``jax.device_put`` it once before use).
      config: The config as read.
  """

  module: nn.Module
  params: Any
  config: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
  """An imported Stable-Diffusion pipeline.

  Attributes:
      unet: The denoiser (:class:`~diffjax.models.unet_condition.UNetCondition`).
      vae: The autoencoder (:class:`~diffjax.models.AutoencoderKL`).
      text_encoder: The CLIP text encoder (:class:`~diffjax.models.clip_text.CLIPTextModel`).
      tokenizer: Its tokenizer.
      scheduler: The noise schedule and DDIM conventions.
      controlnet: A ControlNet, or ``None``.
      path: The directory.
      model_index: ``model_index.json`` as read.
  """

  unet: LoadedModel
  vae: LoadedModel
  text_encoder: LoadedModel
  tokenizer: CLIPTokenizer
  scheduler: SchedulerConfig
  controlnet: LoadedModel | None
  path: Path
  model_index: Mapping[str, Any]

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent along each side, ``2 ** (len(vae.block_out_channels) - 1)``."""
    return 2 ** (len(tuple(self.vae.module.block_out_channels)) - 1)

  @property
  def scaling_factor(self) -> float:
    """The VAE's latent scaling factor (0.18215 in SD 1.x/2.x)."""
    return float(self.vae.config.get("scaling_factor", 0.18215))

  @property
  def shift_factor(self) -> float:
    """The VAE's latent shift (0 unless the config sets one)."""
    return float(self.vae.config.get("shift_factor") or 0.0)

  @property
  def default_size(self) -> tuple[int, int]:
    """``(height, width)`` of images from the U-Net's ``sample_size`` (512 x 512 for SD 1.5)."""
    s = self.unet.config.get("sample_size") or 64
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor


def _load(
  path: str | os.PathLike,
  *,
  kind: str,
  stem: str,
  build: Callable[[Mapping[str, Any]], nn.Module],
  template: Callable[[nn.Module, Mapping[str, Any]], Any],
  variant: str | None,
  dtype: jnp.dtype,
  ignore: tuple[str, ...] = (),
  prefix: str = "",
) -> LoadedModel:
  path = Path(path)
  config = read_json(path / "config.json", what=f"{kind} config")
  try:
    module = build(config).clone(dtype=dtype)
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{path / 'config.json'}: {err}") from err
  files = weights_files(path, stem=stem, variant=variant)
  state = read_safetensors(files)
  if prefix:
    state = {k.removeprefix(prefix): v for k, v in state.items()}
  what = f"{kind} weights {', '.join(str(f) for f in files)}"
  params = to_params(state, template=template(module, config), what=what, ignore=ignore)
  return LoadedModel(module=module, params=params, config=config)


@functools.lru_cache(maxsize=64)
def init_shapes(module: nn.Module, *inputs: tuple[tuple[int, ...], str]) -> Any:
  """The parameter shapes of ``module`` (``jax.eval_shape`` of ``init``), cached per module and input shapes.

  Args:
      module: A hashable Flax module.
      *inputs: ``(shape, dtype name)`` of each positional input of ``module.init``.

  Returns:
      The ``"params"`` tree of ``jax.ShapeDtypeStruct``.
  """
  args = [jnp.zeros(shape, dtype) for shape, dtype in inputs]
  return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def _unet_template(module: UNetCondition, config: Mapping[str, Any]) -> Any:
  dim = config.get("cross_attention_dim", 1280)
  if not isinstance(dim, int):
    raise ValueError(f"cross_attention_dim={dim!r} is not supported (one int: the text encoder's width)")  # noqa: TRY004
  f = module.downsample_factor
  return init_shapes(
    module, ((1, f, f, module.in_channels), "float32"), ((1,), "float32"), ((1, 1, dim), "float32")
  )


def load_unet(path: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads a ``UNet2DConditionModel`` folder as a :class:`~diffjax.models.unet_condition.UNetCondition`.

  Args:
      path: The folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).
      variant: Weights variant, e.g. ``"fp16"`` (weights are returned as float32 either way).
      dtype: Compute dtype of the module (parameters stay float32).

  Raises:
      FileNotFoundError: If the config or weights are missing.
      ValueError: On an unsupported config value, pickle-only weights, or missing / unexpected /
          mis-shaped tensors (named).
  """
  return _load(
    path,
    kind="UNet2DConditionModel",
    stem=DIFFUSERS_WEIGHTS,
    build=lambda c: UNetCondition(**unet_condition_kwargs(c)),
    template=_unet_template,
    variant=variant,
    dtype=dtype,
  )


def load_unet2d(path: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads a ``UNet2DModel`` folder (DDPM-style pixel U-Nets) as a :class:`~diffjax.models.UNet`.

  Raises:
      FileNotFoundError, ValueError: As :func:`load_unet`.
  """

  def template(module: UNet, config: Mapping[str, Any]) -> Any:
    f = module.downsample_factor
    return init_shapes(module, ((1, f, f, module.in_channels), "float32"), ((1,), "float32"))

  return _load(
    path,
    kind="UNet2DModel",
    stem=DIFFUSERS_WEIGHTS,
    build=lambda c: UNet(**unet2d_kwargs(c)),
    template=template,
    variant=variant,
    dtype=dtype,
  )


def load_vae(path: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads an ``AutoencoderKL`` folder as a :class:`~diffjax.models.AutoencoderKL`.

  Raises:
      FileNotFoundError, ValueError: As :func:`load_unet`.
  """

  def template(module: AutoencoderKL, config: Mapping[str, Any]) -> Any:
    f = module.downsample_factor
    return init_shapes(module, ((1, f, f, module.in_channels), "float32"))

  return _load(
    path,
    kind="AutoencoderKL",
    stem=DIFFUSERS_WEIGHTS,
    build=lambda c: AutoencoderKL(**autoencoder_kwargs_from_diffusers_config(c)),
    template=template,
    variant=variant,
    dtype=dtype,
  )


def load_text_encoder(
  path: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32
) -> LoadedModel:
  """Loads a transformers ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors``).

  Tensor names with or without the ``text_model.`` prefix of older checkpoints are accepted; the
  ``position_ids`` buffer is ignored.

  Raises:
      FileNotFoundError, ValueError: As :func:`load_unet`.
  """

  def template(module: CLIPTextModel, config: Mapping[str, Any]) -> Any:
    return init_shapes(module, ((1, 1), "int32"))

  return _load(
    path,
    kind="CLIPTextModel",
    stem=TRANSFORMERS_WEIGHTS,
    build=lambda c: CLIPTextModel(**clip_text_kwargs(c)),
    template=template,
    variant=variant,
    dtype=dtype,
    ignore=(r"embeddings\.position_ids",),
    prefix="text_model.",
  )


def _check_index(path: Path, index: Mapping[str, Any]) -> None:
  name = index.get("_class_name")
  if name not in PIPELINES:
    raise ValueError(
      f"'{path / 'model_index.json'}': pipeline {name!r} is not supported (supported: {PIPELINES})"
    )
  problems = []
  for key, value in index.items():
    if key.startswith("_") or key in _IGNORED:
      continue
    if key not in _COMPONENTS and key != "scheduler":
      problems.append(f"component {key!r} ({value}) is not supported")
      continue
    if key == "scheduler":
      continue
    entry = tuple(value) if isinstance(value, list | tuple) else ()
    if entry not in _COMPONENTS[key]:
      problems.append(f"{key} is {value}, expected one of {sorted(_COMPONENTS[key])}")
  for key in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if key not in index:
      problems.append(f"component {key!r} is missing")
  if problems:
    raise ValueError(f"'{path / 'model_index.json'}':\n" + "\n".join(problems))


def load_pipeline(
  path: str | os.PathLike,
  *,
  variant: str | None = None,
  dtype=jnp.float32,
  controlnet: str | os.PathLike | None = None,
) -> StableDiffusion:
  """Loads a Stable-Diffusion pipeline directory.

  Args:
      path: The directory with ``model_index.json``.
      variant: Weights variant of every model folder (e.g. ``"fp16"``), or ``None``.
      dtype: Compute dtype of the modules (parameters stay float32).
      controlnet: A ``ControlNetModel`` folder to load instead of (or in the absence of) the
          directory's own ``controlnet/``.

  Returns:
      The :class:`StableDiffusion` components.

  Raises:
      FileNotFoundError: If the directory, ``model_index.json`` or a component's files are missing.
      ValueError: On an unsupported pipeline or component, a config value this port does not implement,
          weights that do not fit the config (naming the tensor), or components that do not fit
          together (latent channels, context width).
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"pipeline directory '{path}' does not exist")
  index = read_json(path / "model_index.json", what="pipeline index")
  _check_index(path, index)
  unet = load_unet(path / "unet", variant=variant, dtype=dtype)
  vae = load_vae(path / "vae", variant=variant, dtype=dtype)
  text = load_text_encoder(path / "text_encoder", variant=variant, dtype=dtype)
  tokenizer = CLIPTokenizer.from_directory(path / "tokenizer")
  sched_cfg = read_json(path / "scheduler" / "scheduler_config.json", what="scheduler config")
  try:
    scheduler = scheduler_from_config(sched_cfg)
  except ValueError as err:
    raise ValueError(f"'{path / 'scheduler' / 'scheduler_config.json'}': {err}") from err
  net = None
  if controlnet is not None or "controlnet" in index:
    from diffjax.pretrained.controlnet import load_controlnet

    net = load_controlnet(
      path / "controlnet" if controlnet is None else controlnet, variant=variant, dtype=dtype
    )
  problems = []
  if (
    unet.module.in_channels != vae.module.latent_channels
    or unet.module.out_channels != vae.module.latent_channels
  ):
    problems.append(
      f"the U-Net maps {unet.module.in_channels} -> {unet.module.out_channels} channels but the VAE's latents have "
      f"{vae.module.latent_channels}"
    )
  if unet.config.get("cross_attention_dim") != text.module.hidden_size:
    problems.append(
      f"the U-Net's cross_attention_dim={unet.config.get('cross_attention_dim')} differs from the text encoder's "
      f"hidden_size={text.module.hidden_size}"
    )
  if tokenizer.vocab_size > text.module.vocab_size:
    problems.append(
      f"the tokenizer has {tokenizer.vocab_size} ids, the text encoder only {text.module.vocab_size}"
    )
  if tokenizer.model_max_length > text.module.max_position_embeddings:
    problems.append(
      f"tokenizer model_max_length={tokenizer.model_max_length} exceeds the text encoder's "
      f"max_position_embeddings={text.module.max_position_embeddings}"
    )
  if problems:
    raise ValueError(f"'{path}': the components do not fit together:\n" + "\n".join(problems))
  return StableDiffusion(
    unet=unet,
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    scheduler=scheduler,
    controlnet=net,
    path=path,
    model_index=index,
  )
