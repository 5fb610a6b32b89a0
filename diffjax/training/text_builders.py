"""Turn a text-to-image config into its parts, and restore a trained text-to-image work directory.

Only this module (with :mod:`diffjax.training.text_loop` and the CLI) reads text-to-image configs; the
config keys are documented in ``configs/scenes_text.py``. A work directory is self-contained: besides
``config.json`` and the checkpoints it holds a copy of the frozen autoencoder (``autoencoder.safetensors``
+ ``autoencoder.json``, see :func:`diffjax.latent.save_codec`) when the model diffuses latents.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax.checkpoints import restore_saved
from diffjax.data import SceneDataset, load_dataset, make_scenes, split_holdout
from diffjax.latent import CODEC_FILES, LatentCodec, channel_normalized, load_codec, save_codec
from diffjax.models.unet_condition import UNetCondition
from diffjax.schedules import Schedule
from diffjax.text_conditioning import PromptEncoder, make_text_model_fn
from diffjax.training import builders
from diffjax.training.state import create_train_state

__all__ = [
  "TextRun",
  "build_codec",
  "build_prompt_encoder",
  "build_scene_data",
  "init_text_params",
  "is_text_config",
  "load_text_run",
  "root_key",
  "scene_image_shape",
]

# Fixed sub-streams of a run's root key (as in diffjax.training.loop).
INIT, TRAIN, SAMPLE, TEXT_INIT = 0, 1, 2, 4
NORMALIZE_EXAMPLES = 4096  # images whose latents set the per-channel statistics


def root_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The run's root key: ``config.seed`` with the PRNG implementation ``config.rng_impl``.

  ``"threefry2x32"`` (the default) or e.g. ``"rbg"``/``"unsafe_rbg"``, which compile much faster on CPU
  (parameter initialisation compiles one generator per parameter; the smoke config uses it).
  """
  return jax.random.key(config.seed, impl=config.get("rng_impl", "threefry2x32"))


def is_text_config(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config`` describes a text-to-image run (it has a ``text`` section)."""
  return "text" in config


def scene_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """``(H, W, 1)`` of the scenes: ``(cell_size, 2 * cell_size, 1)``."""
  c = int(config.data.cell_size)
  return c, 2 * c, 1


def build_scene_data(config: ml_collections.ConfigDict) -> tuple[SceneDataset, SceneDataset]:
  """Training and held-out two-digit scenes, composed from disjoint digit images.

  The digit source is split with ``data.holdout`` digits held out; ``data.num_scenes`` training scenes
  are composed from the rest and ``data.num_heldout_scenes`` from the held-out digits (seed
  ``data.scene_seed`` and ``+ 1``), all with every caption template.
  """
  d = config.data
  digits = load_dataset(source=d.source, path=d.get("path"), split=d.split, data_dir=d.get("data_dir"))
  train_digits, heldout_digits = split_holdout(digits, holdout=d.holdout, seed=config.seed)
  kw = {"cell_size": d.cell_size, "max_shift": d.max_shift, "distinct": d.distinct}
  train = make_scenes(train_digits, num_scenes=d.num_scenes, seed=d.scene_seed, **kw)
  heldout = make_scenes(heldout_digits, num_scenes=d.num_heldout_scenes, seed=d.scene_seed + 1, **kw)
  return train, heldout


def build_prompt_encoder(config: ml_collections.ConfigDict, *, key: jax.Array) -> PromptEncoder:
  """The configured text encoder (``text.encoder``: ``"minilm"`` frozen or ``"small"`` trainable)."""
  t = config.text
  overrides = dict(t.get("small_overrides") or {}) if t.encoder == "small" else {}
  return PromptEncoder.build(kind=t.encoder, max_length=t.max_length, key=key, **overrides)


def build_codec(
  config: ml_collections.ConfigDict, workdir: str | None = None, *, images: np.ndarray | None = None
) -> LatentCodec | None:
  """The frozen autoencoder of a latent model, or ``None`` for a pixel-space model.

  A copy stored in ``workdir`` wins (it is what the run was trained with); otherwise it is read from
  ``latent.autoencoder_workdir``, standardised per channel on (the first 4,096 of) ``images`` when ``latent.normalize`` is
  ``"channel"`` (:func:`diffjax.latent.channel_normalized`; else the autoencoder's own scaling factor is
  kept) and, when ``workdir`` is given, copied there.

  Raises:
      ValueError: If per-channel statistics are asked for but no ``images`` are given.
  """
  path = config.latent.get("autoencoder_workdir")
  if not path:
    return None
  if workdir and all(os.path.isfile(os.path.join(workdir, n)) for n in CODEC_FILES):
    return load_codec(workdir)
  from diffjax.training.autoencoder_restore import load_autoencoder  # Local: only latent runs need it.

  module, params, scaling_factor = load_autoencoder(path, ema=config.latent.get("ema"))
  codec = LatentCodec(module=module, params=params, scaling_factor=scaling_factor)
  normalize = config.latent.get("normalize", "none")
  if normalize not in ("none", "channel"):
    raise ValueError(f"config.latent.normalize={normalize!r} is not one of ('none', 'channel')")
  if normalize == "channel":
    if images is None:
      raise ValueError("latent.normalize='channel' needs the training images to compute the statistics")
    codec = channel_normalized(codec, images[:NORMALIZE_EXAMPLES])
  if workdir:
    save_codec(workdir, codec, source=os.path.abspath(path))
  return codec


def init_text_params(
  unet: UNetCondition, prompts: PromptEncoder, *, key: jax.Array, sample_shape: tuple[int, int, int]
) -> Any:
  """U-Net parameters (``{"unet", "text_encoder"}`` when the encoder is trainable)."""
  x = jnp.zeros((1, *sample_shape), jnp.float32)
  ctx = jnp.zeros((1, prompts.max_length, prompts.context_dim), jnp.float32)
  mask = jnp.ones((1, prompts.max_length), jnp.int32)
  unet_params = unet.init({"params": key}, x, jnp.zeros((1,), jnp.int32), ctx, mask)["params"]
  if not prompts.trainable:
    return unet_params
  return {"unet": unet_params, "text_encoder": prompts.params}


@dataclasses.dataclass
class TextRun:
  """A trained (or freshly initialised) text-to-image model and everything needed to sample it.

  Attributes:
      config: The run's config.
      unet: The cross-attention U-Net.
      schedule: Its diffusion schedule.
      params: Model parameters (EMA unless asked otherwise).
      prompts: The prompt encoder.
      codec: The frozen autoencoder, or ``None`` in pixel space.
      image_shape: ``(H, W, C)`` of the generated images.
      sample_shape: ``(h, w, c)`` of what is diffused (latents or images).
      step: The restored checkpoint's step (0 when nothing was restored).
  """

  config: ml_collections.ConfigDict
  unet: UNetCondition
  schedule: Schedule
  params: Any
  prompts: PromptEncoder
  codec: LatentCodec | None
  image_shape: tuple[int, int, int]
  sample_shape: tuple[int, int, int]
  step: int = 0

  @property
  def model_fn(self):
    """``model_fn(params, x_t, t, (tokens, mask))`` of the run, without dropout."""
    return make_text_model_fn(self.unet, text_module=self.prompts.module if self.prompts.trainable else None)


def build_text_run(
  config: ml_collections.ConfigDict,
  *,
  workdir: str | None = None,
  train_images: np.ndarray | None = None,
  abstract: bool = False,
) -> tuple[TextRun, Any]:
  """Builds the run's parts and a fresh train state (not restored).

  ``train_images`` (``uint8 [N, H, W, C]``) are needed only to standardise a new latent codec per channel
  (see :func:`build_codec`). With ``abstract`` the state holds only shapes and dtypes
  (``jax.ShapeDtypeStruct``, enough to restore a checkpoint into, and nothing is compiled).

  Returns:
      ``(run, state)``: ``run.params`` are the initial parameters; ``state`` is a
      :class:`~diffjax.training.state.TrainState` template.
  """
  root = root_key(config)
  prompts = build_prompt_encoder(config, key=jax.random.fold_in(root, TEXT_INIT))
  codec = build_codec(config, workdir, images=train_images)
  image_shape = scene_image_shape(config)
  sample_shape = image_shape if codec is None else codec.latent_shape(image_shape)
  unet = UNetCondition(**config.model.to_dict())
  if unet.in_channels != sample_shape[-1]:
    raise ValueError(
      f"config.model.in_channels={unet.in_channels} but the model diffuses {sample_shape} "
      f"({'latents' if codec else 'images'})"
    )
  tx = builders.build_optimizer(config)

  def init(key):
    params = init_text_params(unet, prompts, key=key, sample_shape=sample_shape)
    return create_train_state(params=params, tx=tx)

  key = jax.random.fold_in(root, INIT)
  state = jax.eval_shape(init, key) if abstract else jax.jit(init)(key)
  run = TextRun(
    config=config,
    unet=unet,
    schedule=builders.build_schedule(config),
    params=state.ema_params,
    prompts=prompts,
    codec=codec,
    image_shape=image_shape,
    sample_shape=sample_shape,
  )
  return run, state


def load_text_run(workdir: str, *, step: int | None = None, ema: bool = True) -> TextRun:
  """Restores a text-to-image run from ``workdir`` (config.json, checkpoints, autoencoder copy).

  Raises:
      FileNotFoundError: If the workdir, a checkpoint or the autoencoder copy is missing.
      ValueError: If the workdir is not a text-to-image run or ``step`` has no checkpoint.
  """
  from diffjax.training.workdir import read_config

  config = read_config(workdir)
  if not is_text_config(config):
    raise ValueError(f"workdir {workdir!r} is not a text-to-image run (its config has no 'text' section)")
  if config.latent.get("autoencoder_workdir") and not all(
    os.path.isfile(os.path.join(workdir, n)) for n in CODEC_FILES
  ):
    raise FileNotFoundError(f"workdir {workdir!r} lacks its autoencoder copy ({', '.join(CODEC_FILES)})")
  run, template = build_text_run(config, workdir=workdir, abstract=True)
  state, run.step = restore_saved(workdir, template, step=step)
  run.params = state.ema_params if ema else state.params
  return run
