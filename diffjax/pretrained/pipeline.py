"""Text-to-image and image-to-image (SDEdit) on an imported Stable-Diffusion pipeline, jitted end to end.

The computation is diffusers' ``StableDiffusionPipeline`` (Rombach et al. 2022) with the scheduler
replaced by DDIM as the scheduler config describes it (:mod:`diffjax.pretrained.scheduler`):

1. the prompts and the negative prompt (``""`` by default) are tokenized to ``model_max_length`` ids and
   encoded by CLIP; every position, padding included, is context (no mask), as in diffusers;
2. from latents ``[B, H/f, W/f, c]`` (given, or standard normal from the key), DDIM runs the U-Net on the
   prompt and negative contexts in one batch and combines them with classifier-free guidance
   ``uncond + w * (cond - uncond)`` (Ho & Salimans 2022);
3. the latents are decoded by the VAE after dividing by its ``scaling_factor`` (and adding its
   ``shift_factor``), and mapped from ``[-1, 1]`` to ``[0, 1]``.

Image-to-image is SDEdit (Meng et al. 2022) through :func:`diffjax.editing.sdedit.sdedit`: the image's VAE
latents are noised to the ``ceil(strength * num_steps)``-th timestep of the scheduler's table and
denoised from there. ``num_steps``, ``guidance``, ``eta`` and ``strength`` are traced, and the timestep
table is an argument, so none of them recompiles.

The U-Net call is one function, :func:`make_unet_fn`, the place where other conditioning (ControlNet
residuals here; attention control such as prompt-to-prompt) wraps the denoiser: every sampler below takes
any ``model_fn(params, x_t, t, cond)`` with that signature.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.editing.sdedit import check_strength, sdedit
from diffjax.guidance import classifier_free_guidance
from diffjax.pretrained.loader import StableDiffusion
from diffjax.samplers.ddim import ddim_sample

__all__ = [
  "decode_latents",
  "encode_prompts",
  "make_image_to_image",
  "make_text_to_image",
  "make_unet_fn",
  "pipeline_params",
]


def pipeline_params(sd: StableDiffusion) -> dict[str, Any]:
  """All parameter trees on the default device, once: ``{"unet", "vae", "text_encoder"[, "controlnet"]}``."""
  params = {"unet": sd.unet.params, "vae": sd.vae.params, "text_encoder": sd.text_encoder.params}
  if sd.controlnet is not None:
    params["controlnet"] = sd.controlnet.params
  return jax.device_put(params)


def make_unet_fn(sd: StableDiffusion) -> Callable:
  """The denoiser as ``model_fn(params, z_t, t, cond, *, attention_control=None) -> prediction``.

  ``params`` is the dict of :func:`pipeline_params`; ``cond`` is the context ``[B, L, D]``, or with a
  ControlNet the tuple ``(context, control_image [B, H, W, 3] in [0, 1], conditioning_scale [B])``.
  ``attention_control`` (``(probs, info) -> probs``, see :mod:`diffjax.models.attention_control`) is
  handed to every attention layer of the U-Net (not of the ControlNet), e.g. for prompt-to-prompt::

      unet_fn = make_unet_fn(sd)
      model_fn = lambda p, z, t, c: unet_fn(p, z, t, c, attention_control=control)
      generate = make_text_to_image(sd, model_fn=model_fn)
  """
  return _unet_fn(sd.unet.module, None if sd.controlnet is None else sd.controlnet.module)


def _unet_fn(unet: nn.Module, controlnet: nn.Module | None) -> Callable:
  if controlnet is None:

    def model_fn(params, z, t, cond, *, attention_control=None):
      return unet.apply({"params": params["unet"]}, z, t, cond, attention_control=attention_control)

    return model_fn
  from diffjax.pretrained.controlnet import controlled_unet_fn

  return controlled_unet_fn(unet, controlnet)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about a pipeline: equal specs share compiled functions (even across loads)."""

  unet: nn.Module
  vae: nn.Module
  controlnet: nn.Module | None
  model_fn: Callable | None
  prediction: str
  clip_x0: float | None
  scaling_factor: float
  shift_factor: float

  @classmethod
  def of(cls, sd: StableDiffusion, model_fn: Callable | None) -> _Spec:
    return cls(
      unet=sd.unet.module,
      vae=sd.vae.module,
      controlnet=None if sd.controlnet is None else sd.controlnet.module,
      model_fn=model_fn,
      prediction=sd.scheduler.prediction,
      clip_x0=sd.scheduler.clip_x0,
      scaling_factor=sd.scaling_factor,
      shift_factor=sd.shift_factor,
    )

  def guided(self, params, guidance, null_cond, model_fn: Callable | None = None) -> Callable:
    """The classifier-free-guided denoiser over ``params``, of ``model_fn`` (default: the spec's)."""
    base = model_fn or self.model_fn or _unet_fn(self.unet, self.controlnet)
    guided = classifier_free_guidance(base, guidance_scale=guidance, null_cond=null_cond)
    return lambda p, x, t, c: guided(params, x, t, c)

  def decode(self, vae_params, latents):
    z = latents / self.scaling_factor + self.shift_factor
    images = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
    return jnp.clip(images / 2.0 + 0.5, 0.0, 1.0)


def _guided_ddim(
  spec: _Spec,
  params,
  schedule,
  key,
  latents,
  cond,
  null_cond,
  table,
  num_steps,
  guidance,
  eta,
  *,
  model_fn: Callable | None = None,
):
  """Guided DDIM over the scheduler's ``table`` from ``latents``, then decoded (traceable).

  The text-to-image computation shared by :func:`make_text_to_image` and
  :func:`diffjax.pretrained.prompt_to_prompt.make_prompt_to_prompt` (which passes its attention-controlled
  ``model_fn``; default: the spec's).

  Returns:
      ``(images [B, H, W, 3] in [0, 1], latents [B, h, w, c])``.
  """
  z = ddim_sample(
    model_fn=spec.guided(params, guidance, null_cond, model_fn),
    params=None,
    schedule=schedule,
    x_T=latents,
    key=key,
    cond=cond,
    num_steps=num_steps,
    eta=eta,
    prediction=spec.prediction,
    clip_x0=spec.clip_x0,
    table=table,
    eps_from_clipped_x0=False,
  )
  return spec.decode(params["vae"], z), z


@functools.partial(jax.jit, static_argnums=0)
def _text_to_image(
  spec: _Spec, params, schedule, key, latents, cond, null_cond, table, num_steps, guidance, eta
):
  return _guided_ddim(spec, params, schedule, key, latents, cond, null_cond, table, num_steps, guidance, eta)


@functools.partial(jax.jit, static_argnums=0)
def _image_to_image(
  spec: _Spec, params, schedule, key, images, cond, null_cond, table, num_steps, strength, guidance, eta
):
  post = spec.vae.apply({"params": params["vae"]}, images * 2.0 - 1.0, method=spec.vae.encode)
  z0 = (post.sample(jax.random.fold_in(key, 0)) - spec.shift_factor) * spec.scaling_factor
  z = sdedit(
    model_fn=spec.guided(params, guidance, null_cond),
    params=None,
    schedule=schedule,
    x_guide=z0,
    key=jax.random.fold_in(key, 1),
    strength=strength,
    cond=cond,
    sampler="ddim",
    num_steps=num_steps,
    eta=eta,
    prediction=spec.prediction,
    clip_x0=spec.clip_x0,
    table=table,
    eps_from_clipped_x0=False,
  )
  return spec.decode(params["vae"], z), z


def encode_prompts(
  sd: StableDiffusion, params: dict[str, Any], prompts: Sequence[str], *, clip_skip: int = 0
) -> jnp.ndarray:
  """CLIP contexts of prompts, as diffusers' ``encode_prompt``.

  Args:
      sd: The pipeline.
      params: :func:`pipeline_params`.
      prompts: ``B`` strings (too long ones are truncated with a warning, as in diffusers).
      clip_skip: Use the hidden states of the layer ``clip_skip`` before the last (diffusers' ``clip_skip``).

  Returns:
      float32 ``[B, model_max_length, hidden_size]``.
  """
  ids, _ = sd.tokenizer.encode(list(prompts))
  return _encode(sd.text_encoder.module, params["text_encoder"], jnp.asarray(ids), clip_skip)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(module, params, ids, clip_skip):
  return module.apply({"params": params}, ids, clip_skip=clip_skip)[0]


def decode_latents(sd: StableDiffusion, vae_params: Any, latents: jnp.ndarray) -> jnp.ndarray:
  """VAE decoding of scaled latents to images in ``[0, 1]`` (diffusers' ``output_type="np"``); traceable."""
  return _Spec.of(sd, None).decode(vae_params, latents)


def _latent_shape(sd: StableDiffusion, height: int | None, width: int | None) -> tuple[int, int, int]:
  h, w = sd.default_size
  h, w = int(height or h), int(width or w)
  f = sd.vae_scale_factor * sd.unet.module.downsample_factor
  if h % f or w % f or h < f or w < f:
    raise ValueError(f"height and width must be positive multiples of {f} for this pipeline, got {h} x {w}")
  return h // sd.vae_scale_factor, w // sd.vae_scale_factor, sd.vae.module.latent_channels


def _initial_latents(
  sd: StableDiffusion, key, latents, *, batch: int, height: int | None, width: int | None, what: str
) -> jnp.ndarray:
  """The starting latents ``[batch, h, w, c]``: ``latents`` checked, or drawn from ``fold_in(key, 0)``.

  Raises:
      ValueError: If the size does not fit the pipeline, or ``latents`` is not ``[batch, h, w, c]``
          (``what`` names the batch in the message).
  """
  shape = (batch, *_latent_shape(sd, height, width))
  if latents is None:
    latents = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
  latents = jnp.asarray(latents, jnp.float32)
  if latents.shape != shape:
    raise ValueError(f"latents must be {list(shape)} for {what}, got {list(latents.shape)}")
  return latents


def _check_batch(context, null_context):
  context, null_context = jnp.asarray(context), jnp.asarray(null_context)
  if context.ndim != 3 or null_context.shape != context.shape:
    raise ValueError(
      f"context and null_context must both be [B, L, D], got {context.shape} and {null_context.shape}"
    )
  return context, null_context


def make_text_to_image(sd: StableDiffusion, *, model_fn: Callable | None = None) -> Callable:
  """Builds ``generate(params, key, context, null_context, ...)`` (one compilation per batch shape).

  Args:
      sd: The pipeline.
      model_fn: The denoiser; default :func:`make_unet_fn` (pass a wrapped one, e.g. with attention control).

  Returns:
      ``generate(params, key, context, null_context, *, num_steps=50, guidance=7.5, eta=0.0, latents=None,
      height=None, width=None, control=None) -> (images [B, H, W, 3] in [0, 1], latents [B, h, w, c])``:
      ``context``/``null_context`` ``[B, L, D]`` from :func:`encode_prompts` (the null context is the
      negative prompt's); ``latents`` the initial noise (default: standard normal from ``key``); with a
      ControlNet, ``control = (image [B, H, W, 3] in [0, 1], conditioning_scale)``.
  """
  spec, sched = _Spec.of(sd, model_fn), sd.scheduler

  def generate(
    params,
    key,
    context,
    null_context,
    *,
    num_steps=50,
    guidance=7.5,
    eta=0.0,
    latents=None,
    height=None,
    width=None,
    control=None,
  ):
    context, null_context = _check_batch(context, null_context)
    latents = _initial_latents(
      sd, key, latents, batch=context.shape[0], height=height, width=width, what="these prompts and this size"
    )
    if not 0.0 <= float(eta) <= 1.0:
      raise ValueError(f"eta must be in [0, 1], got {eta}")
    cond, null_cond = _conditions(sd, context, null_context, control, latents.shape)
    return _text_to_image(
      spec,
      params,
      sched.schedule,
      jax.random.fold_in(key, 1),
      latents,
      cond,
      null_cond,
      sched.table(num_steps),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(eta, jnp.float32),
    )

  return generate


def _conditions(sd, context, null_context, control, latent_shape):
  """The ``cond``/``null_cond`` pytrees of :func:`make_unet_fn` for these contexts (and control image)."""
  if sd.controlnet is None:
    if control is not None:
      raise ValueError("a control image was given but the pipeline has no ControlNet")
    return context, null_context
  if control is None:
    raise ValueError("this pipeline has a ControlNet: give control=(image [B, H, W, 3] in [0, 1], scale)")
  image, scale = control
  b, h, w = latent_shape[:3]
  image = jnp.asarray(image, jnp.float32)
  f = sd.vae_scale_factor
  if image.shape != (b, h * f, w * f, 3):
    raise ValueError(f"control image must be [B, H, W, 3] = {[b, h * f, w * f, 3]}, got {list(image.shape)}")
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,))
  # Classifier-free guidance runs the ControlNet on both halves with the same image, as diffusers does.
  return (context, image, scale), (null_context, image, scale)


def make_image_to_image(sd: StableDiffusion, *, model_fn: Callable | None = None) -> Callable:
  """Builds ``edit(params, key, images, context, null_context, *, strength=0.6, ...)``: SDEdit in latent space.

  Returns:
      ``edit(params, key, images [B, H, W, 3] in [0, 1], context, null_context, *, strength=0.6,
      num_steps=50, guidance=7.5, eta=0.0, control=None) -> (images [B, H, W, 3] in [0, 1], latents)``. The
      images are encoded with a posterior sample of the VAE (as diffusers' img2img pipeline does), scaled,
      and edited by :func:`diffjax.editing.sdedit.sdedit` over the scheduler's timestep table.
  """
  spec, sched, vae = _Spec.of(sd, model_fn), sd.scheduler, sd.vae.module

  def edit(
    params,
    key,
    images,
    context,
    null_context,
    *,
    strength=0.6,
    num_steps=50,
    guidance=7.5,
    eta=0.0,
    control=None,
  ):
    context, null_context = _check_batch(context, null_context)
    images = jnp.asarray(images, jnp.float32)
    b = context.shape[0]
    if images.ndim != 4 or images.shape[0] != b or images.shape[-1] != vae.in_channels:
      raise ValueError(f"images must be [B={b}, H, W, {vae.in_channels}] in [0, 1], got {list(images.shape)}")
    _latent_shape(sd, images.shape[1], images.shape[2])
    check_strength(strength)
    if not 0.0 <= float(eta) <= 1.0:
      raise ValueError(f"eta must be in [0, 1], got {eta}")
    f = sd.vae_scale_factor
    latent = (b, images.shape[1] // f, images.shape[2] // f, vae.latent_channels)
    cond, null_cond = _conditions(sd, context, null_context, control, latent)
    return _image_to_image(
      spec,
      params,
      sched.schedule,
      key,
      images,
      cond,
      null_cond,
      sched.table(num_steps),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(strength, jnp.float32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(eta, jnp.float32),
    )

  return edit


def to_uint8_images(images: Any) -> np.ndarray:
  """``[0, 1]`` float images to uint8 (``round(255 x)``), as diffusers' ``numpy_to_pil``."""
  return np.asarray(np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255), np.uint8)
