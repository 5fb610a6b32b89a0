"""Latent diffusion: diffuse in the latent space of a frozen autoencoder, decode the samples.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models")
trains the denoiser on ``z = scaling_factor * E(x)`` (the autoencoder's latents rescaled to unit
variance, their Sec. 4.3.2) and decodes sampled latents with ``D(z / scaling_factor)``. The denoiser is
an ordinary ``model_fn(params, z_t, t, cond)`` on latents, so everything written against that interface
applies unchanged; this module supplies the two ends:

* :class:`LatentCodec`: a frozen :class:`~diffjax.models.autoencoder.AutoencoderKL` with its parameters
  and scaling factor, as a pytree (its parameters are leaves, so it can be passed into ``jit``);
* :func:`latent_loss`: wraps a loss taking clean data ``x0`` (e.g. :func:`diffjax.losses.diffusion_loss`)
  into one taking images, which it encodes first (no gradient reaches the autoencoder);
* :func:`latent_sampler`: wraps any sampler taking initial noise ``x_T`` (``ddim_sample``,
  ``ddpm_sample``, ``dpm_solver_sample``) into one whose noise is latent-shaped and whose output is
  decoded images; ``x0`` clipping is off by default, since scaled latents are not confined to
  ``[-1, 1]``;
* :func:`encode_images`: precomputes the latents of a dataset once (the encoder is frozen), so training
  costs only the denoiser's step.

An autoencoder trained by :mod:`diffjax.training.autoencoder_loop` is read from its work directory with
:func:`diffjax.training.autoencoder_restore.load_autoencoder` (``LatentCodec(*load_autoencoder(w))``);
:func:`save_codec` / :func:`load_codec` store a codec as ``autoencoder.safetensors`` + ``autoencoder.json``
(no pickle) inside another work directory, e.g. the diffusion run trained on its latents.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from diffjax.data import to_model_range
from diffjax.models.autoencoder import AutoencoderKL, make_codec

__all__ = [
  "CODEC_FILES",
  "LatentCodec",
  "channel_normalized",
  "encode_images",
  "latent_loss",
  "latent_sampler",
  "load_codec",
  "save_codec",
]

CODEC_FILES = ("autoencoder.safetensors", "autoencoder.json")


@struct.dataclass
class LatentCodec:
  """A frozen autoencoder in the scaled latent space of diffusion.

  Attributes:
      module: The autoencoder (static).
      params: Its parameters (pytree leaves).
      scaling_factor: ``z = scaling_factor * (E(x) - shift_factor)``: one float (Stable Diffusion's
          convention) or a tuple of one per latent channel (see :func:`channel_normalized`; static).
      shift_factor: See ``scaling_factor`` (0 for SD-1/2 VAEs; static).
  """

  module: AutoencoderKL = struct.field(pytree_node=False)
  params: Any
  scaling_factor: float | tuple[float, ...] = struct.field(pytree_node=False, default=1.0)
  shift_factor: float | tuple[float, ...] = struct.field(pytree_node=False, default=0.0)

  def _codec(self):
    return make_codec(
      self.module,
      scaling_factor=jnp.asarray(self.scaling_factor, jnp.float32),
      shift_factor=jnp.asarray(self.shift_factor, jnp.float32),
    )

  def encode(self, images: jnp.ndarray, key: jax.Array | None = None) -> jnp.ndarray:
    """Scaled latents of ``[B, H, W, C]`` images in ``[-1, 1]``: posterior mode, or a sample with ``key``.

    Returns:
        ``[B, H/f, W/f, latent_channels]``.
    """
    return self._codec()[0](self.params, images, key)

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    """Images ``[B, H, W, C]`` (nominally in ``[-1, 1]``) from scaled latents ``[B, h, w, c]``."""
    return self._codec()[1](self.params, latents)

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(h, w, c)`` of the latents of ``(H, W, C)`` images.

    Raises:
        ValueError: If ``H`` or ``W`` is not divisible by the downsampling factor or ``C`` is wrong.
    """
    h, w, c = (int(v) for v in image_shape)
    f = self.module.downsample_factor
    if h % f or w % f or c != self.module.in_channels:
      raise ValueError(
        f"images {image_shape} do not fit the autoencoder: need H, W divisible by {f} and "
        f"{self.module.in_channels} channels"
      )
    return h // f, w // f, int(self.module.latent_channels)


def encode_images(
  codec: LatentCodec, images_uint8: np.ndarray, *, batch_size: int = 256, key: jax.Array | None = None
) -> np.ndarray:
  """Latents of a whole uint8 dataset, computed once in fixed-size batches.

  Args:
      codec: The frozen autoencoder.
      images_uint8: ``uint8 [N, H, W, C]``.
      batch_size: Images per encoder call (the last batch is padded: one compilation).
      key: ``None`` for posterior modes; a key for posterior samples (batch ``i`` uses ``fold_in(key, i)``).

  Returns:
      float32 ``[N, h, w, c]`` scaled latents.
  """
  images_uint8 = np.asarray(images_uint8)
  n = images_uint8.shape[0]
  bs = min(batch_size, n)

  @jax.jit
  def run(c: LatentCodec, x, k):
    return c.encode(x, k)

  out = []
  for i, start in enumerate(range(0, n, bs)):
    chunk = images_uint8[start : start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m, *chunk.shape[1:]), np.uint8)])
    k = None if key is None else jax.random.fold_in(key, i)
    out.append(np.asarray(run(codec, to_model_range(chunk), k))[:m])
  return np.concatenate(out).astype(np.float32)


def channel_normalized(codec: LatentCodec, images_uint8: np.ndarray, *, batch_size: int = 256) -> LatentCodec:
  """The codec with per-channel shift and scale that make the latents of ``images`` zero-mean, unit-variance.

  Stable Diffusion rescales its latents by one factor (Rombach et al. 2022, Sec. 4.3.2); when the
  channels have very different means (as an autoencoder trained on mostly-black digits gives), one global
  factor leaves each channel with a variance well below 1 and a large offset, which lowers the effective
  signal-to-noise ratio of every diffusion step. Standardising each channel (as Esser et al. 2024 do with
  a shift and scale) removes both.

  Args:
      codec: The autoencoder (its own scaling is ignored).
      images_uint8: ``uint8 [N, H, W, C]`` images whose latents (posterior modes) define the statistics.
      batch_size: Images per encoder call.

  Returns:
      A codec with ``shift_factor`` the per-channel means and ``scaling_factor`` the inverse standard
      deviations (tuples of ``latent_channels`` floats).
  """
  raw = dataclasses.replace(codec, scaling_factor=1.0, shift_factor=0.0)
  z = encode_images(raw, images_uint8, batch_size=batch_size).astype(np.float64)
  mean, std = z.mean(axis=(0, 1, 2)), z.std(axis=(0, 1, 2))
  return dataclasses.replace(
    codec,
    scaling_factor=tuple(float(1.0 / s) for s in std),
    shift_factor=tuple(float(m) for m in mean),
  )


def latent_loss(loss_fn: Callable, *, codec: LatentCodec, sample_posterior: bool = False) -> Callable:
  """Wraps a loss over clean data ``x0`` into a loss over images, diffusing their latents.

  Args:
      loss_fn: Keyword-only loss taking ``x0`` and ``key`` (e.g. :func:`diffjax.losses.diffusion_loss`).
      codec: The frozen autoencoder.
      sample_posterior: Encode to a posterior sample (key folded from ``key``) instead of the mode.

  Returns:
      ``loss(*, x0 [B, H, W, C] images in [-1, 1], key, **kwargs)`` equal to
      ``loss_fn(x0=stop_gradient(codec.encode(x0)), key=key, **kwargs)``.
  """

  def wrapped(*, x0: jnp.ndarray, key: jax.Array, **kwargs):
    k_enc = jax.random.fold_in(key, 0x1A7E) if sample_posterior else None
    z0 = jax.lax.stop_gradient(codec.encode(x0, k_enc))
    return loss_fn(x0=z0, key=key, **kwargs)

  return wrapped


def latent_sampler(sampler: Callable, *, codec: LatentCodec, clip_x0: float | None = None) -> Callable:
  """Wraps a sampler so that it starts from latent noise and returns decoded images.

  Args:
      sampler: Keyword-only sampler taking ``x_T`` and ``clip_x0`` (``ddim_sample``, ``ddpm_sample``,
          ``dpm_solver_sample``).
      codec: The frozen autoencoder.
      clip_x0: Passed to the sampler (default ``None``: no static thresholding of latents).

  Returns:
      ``sample(*, x_T [B, h, w, c], **kwargs) -> [B, H, W, C]`` decoded images.
  """

  def wrapped(*, x_T: jnp.ndarray, **kwargs) -> jnp.ndarray:
    kwargs.setdefault("clip_x0", clip_x0)
    return codec.decode(sampler(x_T=x_T, **kwargs))

  return wrapped


def _autoencoder(kwargs: dict) -> AutoencoderKL:
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return AutoencoderKL(**kwargs)


def save_codec(directory: str, codec: LatentCodec, *, source: str | None = None) -> None:
  """Writes ``autoencoder.safetensors`` (parameters) and ``autoencoder.json`` (arguments, scaling)."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(codec.params), sep="/")
  save_file({k: np.asarray(v, np.float32) for k, v in flat.items()}, os.path.join(directory, CODEC_FILES[0]))
  fields = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels")
  fields += ("norm_num_groups", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
  meta = {
    "model": {k: getattr(codec.module, k) for k in fields},
    "scaling_factor": _json_factor(codec.scaling_factor),
    "shift_factor": _json_factor(codec.shift_factor),
    "source": source,
  }
  meta["model"]["block_out_channels"] = list(meta["model"]["block_out_channels"])
  with open(os.path.join(directory, CODEC_FILES[1]), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def _json_factor(value: float | tuple[float, ...]) -> float | list[float]:
  return [float(v) for v in value] if isinstance(value, tuple | list) else float(value)


def _factor(value: float | list[float]) -> float | tuple[float, ...]:
  return tuple(float(v) for v in value) if isinstance(value, list) else float(value)


def load_codec(directory: str) -> LatentCodec:
  """Reads a codec written by :func:`save_codec`.

  Raises:
      FileNotFoundError: If a file is missing.
  """
  from safetensors.numpy import load_file

  for name in CODEC_FILES:
    if not os.path.isfile(os.path.join(directory, name)):
      raise FileNotFoundError(f"{directory!r} has no {name}")
  with open(os.path.join(directory, CODEC_FILES[1])) as f:
    meta = json.load(f)
  flat = load_file(os.path.join(directory, CODEC_FILES[0]))
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
  return LatentCodec(
    module=_autoencoder(meta["model"]),
    params=params,
    scaling_factor=_factor(meta["scaling_factor"]),
    shift_factor=_factor(meta.get("shift_factor", 0.0)),
  )
