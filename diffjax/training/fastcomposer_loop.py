"""``train_fastcomposer(config, workdir)``: FastComposer on two-digit scenes, resumable and data-parallel.

FastComposer (Xiao et al. 2023) trains once, on captioned images whose subjects are segmented, and then
personalises any new subject from one reference image with no fine-tuning. Here (config keys in
``configs/fastcomposer.py``):

* the model starts from a trained text-to-image run (``config.base_workdir``): its U-Net is fine-tuned,
  a :class:`~diffjax.models.subject_encoder.SubjectEncoder` and a
  :class:`~diffjax.models.subject_encoder.SubjectFuser` are trained from scratch, MiniLM stays frozen;
* the data are the base run's own training scenes and captions; each scene's two digits are its
  subjects: the reference of a subject is the scene's own digit image, augmented (random rotation,
  scale, shift; FastComposer also takes the subject from the training image itself and augments it), its
  mask is the digit's pixels, its word is the digit word of the caption
  (:func:`~diffjax.personalization.subjects.digit_word_positions`, in caption order);
* each step is :func:`~diffjax.personalization.fastcomposer_step.make_fastcomposer_train_step`
  (denoising loss plus ``localization_weight`` times the cross-attention localization loss), jitted
  with the state replicated and the batch sharded along ``data``.

The work directory holds ``config.json``, ``metrics.jsonl`` (loss, denoising and localization losses),
``subject_encoder.json`` (the reference shape), the scenes' latents and orbax checkpoints; a run resumes where it stopped (batch ``k``, its augmentations
and the step key depend only on the seed and ``k``). :func:`load_fastcomposer` restores it for sampling
(:mod:`diffjax.personalization.sampling`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from diffjax import parallel
from diffjax.checkpoints import restore_or_init, restore_saved, training_checkpointer
from diffjax.data import SCENE_TEMPLATES, batch_indices, to_model_range
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.models.subject_encoder import SubjectEncoder, SubjectFuser
from diffjax.personalization.fastcomposer_step import make_fastcomposer_train_step
from diffjax.personalization.sampling import make_subject_generate
from diffjax.personalization.subjects import augment_digits, digit_word_positions, left_named_first
from diffjax.training.personalize_common import base_data_config, base_digits, load_base
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.step import compile_train_step
from diffjax.training.text_builders import TextRun, build_scene_data
from diffjax.training.text_loop import CaptionTable, _diffusion_targets
from diffjax.training.workdir import MetricsLog, read_config, write_config

__all__ = ["FastComposerRun", "build_fastcomposer", "load_fastcomposer", "train_fastcomposer"]

INIT, TRAIN = 0, 1  # sub-streams of the root key
REFERENCE_FILE = "subject_encoder.json"  # the reference image shape the encoder was built for


@dataclasses.dataclass
class FastComposerRun:
  """A FastComposer model: the base run's parts plus the subject encoder and fuser.

  Attributes:
      config: The FastComposer config.
      base: The base text-to-image run (its U-Net, schedule, prompt encoder, codec).
      encoder: The subject encoder.
      fuser: The fusion MLP.
      params: ``{"unet", "encoder", "fuser"}``.
      ref_shape: ``(h, w, 1)`` of reference images.
      step: The restored step (0 when fresh).
  """

  config: ml_collections.ConfigDict
  base: TextRun
  encoder: SubjectEncoder
  fuser: SubjectFuser
  params: Any
  ref_shape: tuple[int, int, int]
  step: int = 0

  def generate(self, *, sampler: str = "ddim"):
    """The jitted sampler of :func:`diffjax.personalization.sampling.make_subject_generate`."""
    return make_subject_generate(
      unet=self.base.unet,
      encoder=self.encoder,
      fuser=self.fuser,
      schedule=self.base.schedule,
      sample_shape=self.base.sample_shape,
      null_cond=self.base.prompts.null_condition(),
      prediction=self.base.config.diffusion.prediction,
      sampler=sampler,
      codec=self.base.codec,
    )


def _label_tree(label: str, tree: Any) -> Any:
  return jax.tree.map(lambda _: label, tree)


def build_fastcomposer(
  config: ml_collections.ConfigDict, base: TextRun, *, ref_shape: tuple[int, int, int], abstract: bool = False
) -> tuple[FastComposerRun, Any, optax.GradientTransformation]:
  """The model parts, a fresh train state (``abstract``: shapes only) and the optimiser.

  The U-Net starts from the base run's parameters; the encoder and fuser from random initialisations.
  The optimiser is AdamW with ``training.learning_rate`` for the U-Net and ``training.new_learning_rate``
  for the encoder and fuser.
  """
  encoder = SubjectEncoder(**config.encoder.to_dict())
  fuser = SubjectFuser()
  root = jax.random.fold_in(jax.random.key(config.seed), INIT)
  d = base.prompts.context_dim
  t = config.training

  def opt(lr: float) -> optax.GradientTransformation:
    return make_optimizer(
      learning_rate=lr,
      warmup_steps=t.warmup_steps,
      total_steps=t.num_steps,
      decay=t.lr_decay,
      weight_decay=t.weight_decay,
      grad_clip=t.grad_clip,
    )

  tx = optax.multi_transform(
    {"unet": opt(t.learning_rate), "new": opt(t.new_learning_rate)},
    lambda params: {k: _label_tree("unet" if k == "unet" else "new", v) for k, v in params.items()},
  )

  def init(unet_params, key):
    k_enc, k_fuse = jax.random.split(key)
    enc = encoder.init(k_enc, jnp.zeros((1, *ref_shape), jnp.float32))["params"]
    text, subject = jnp.zeros((1, d), jnp.float32), jnp.zeros((1, encoder.embed_dim), jnp.float32)
    fuse = fuser.init(k_fuse, text, subject)["params"]
    params = {"unet": unet_params, "encoder": enc, "fuser": fuse}
    return create_train_state(params=params, tx=tx)

  state = jax.eval_shape(init, base.params, root) if abstract else jax.jit(init)(base.params, root)
  run = FastComposerRun(
    config=config, base=base, encoder=encoder, fuser=fuser, params=state.ema_params, ref_shape=ref_shape
  )
  return run, state, tx


class _SceneSubjects:
  """Per-scene subject data of a training set: word positions, subject sides, reference digits, masks."""

  def __init__(self, scenes, digits, table: CaptionTable, tokenizer, config: ml_collections.ConfigDict):
    unique, _ = np.unique(np.asarray(scenes.captions), return_inverse=True)
    self.positions = digit_word_positions(tokenizer, [str(c) for c in unique])[table.ids]  # [N, 2]
    first = np.array([left_named_first(t) for t in SCENE_TEMPLATES])[scenes.template_ids]
    self.sides = np.where(first[:, None], np.array([[0, 1]]), np.array([[1, 0]])).astype(np.int32)  # [N, 2]
    self.scenes, self.digits, self.refs = scenes, digits, config.references
    self.seed = int(config.seed)

  def gather(self, rows: np.ndarray, step: int) -> dict[str, np.ndarray]:
    sides = self.sides[rows]
    src = np.take_along_axis(self.scenes.source_indices[rows], sides, axis=1)  # [B, 2], caption order
    rng = np.random.default_rng([self.seed, step, 7])
    r = self.refs
    refs = augment_digits(
      self.digits.images[src.reshape(-1)],
      seed=int(rng.integers(2**31)),
      max_rotation=r.max_rotation,
      scale_range=tuple(r.scale_range),
      max_shift=r.max_shift,
    )
    b = rows.shape[0]
    masks = self.scenes.masks[rows][:, None] == (sides + 1)[:, :, None, None]
    return {
      "refs": to_model_range(refs).reshape(b, 2, *refs.shape[1:]),
      "positions": self.positions[rows],
      "valid": (rng.random((b, 2)) < r.object_appear_prob).astype(np.float32),
      "masks": masks.astype(np.float32),
    }


def train_fastcomposer(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) FastComposer in ``workdir``; returns the last metrics (and ``train_s``).

  Raises:
      ValueError: On inconsistent settings.
      FileNotFoundError: If the base work directory or the digits are missing.
  """
  keep_freed_memory_on_cpu()  # reuse the step's freed temporaries (diffjax.host_memory)
  t_cfg, f_cfg = config.training, config.fastcomposer
  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(t_cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(workdir, config)
  base = load_base(config)
  base_config = base_data_config(base.config, config.get("data_path"))
  scenes, _ = build_scene_data(base_config)
  digits, _ = base_digits(base_config)
  if config.data.get("max_scenes"):
    scenes = scenes.subset(np.arange(min(int(config.data.max_scenes), len(scenes))))
  run, fresh, tx = build_fastcomposer(config, base, ref_shape=digits.image_shape)
  if is_main:
    with open(os.path.join(workdir, REFERENCE_FILE), "w") as f:
      json.dump({"reference_shape": list(run.ref_shape)}, f)
  rep = parallel.replicated(mesh)
  ckpt = training_checkpointer(workdir, t_cfg)
  state, start = restore_or_init(ckpt, init=lambda: jax.device_put(fresh, rep))
  log = MetricsLog(workdir, resume_step=start)

  table = CaptionTable(scenes.captions, base.prompts)
  subjects = _SceneSubjects(scenes, digits, table, base.prompts.tokenizer, config)
  latents = _diffusion_targets(scenes, base.codec, workdir)
  d_cfg = base.config.diffusion
  step_fn = compile_train_step(
    make_fastcomposer_train_step(
      unet=base.unet,
      encoder=run.encoder,
      fuser=run.fuser,
      schedule=base.schedule,
      tx=tx,
      null_cond=base.prompts.null_condition(),
      localization_weight=f_cfg.localization_weight,
      localization_layers=tuple(f_cfg.localization_layers),
      prediction=d_cfg.prediction,
      weighting=d_cfg.weighting,
      min_snr_gamma=d_cfg.min_snr_gamma,
      uncondition_prob=f_cfg.uncondition_prob,
      text_only_prob=f_cfg.text_only_prob,
      ema_decay=t_cfg.ema_decay,
    ),
    mesh,
  )
  train_key = jax.device_put(jax.random.fold_in(jax.random.key(config.seed), TRAIN), rep)
  local = t_cfg.batch_size // jax.process_count()
  lo = jax.process_index() * local

  def get_batch(step: int) -> dict:
    rows = batch_indices(
      num_examples=len(scenes), global_batch_size=t_cfg.batch_size, step=step, seed=config.seed
    )
    rows = rows[lo : lo + local]
    x0 = latents[rows] if latents is not None else to_model_range(scenes.images[rows])
    return {"x0": x0, **table.gather(rows), **subjects.gather(rows, step)}

  num_steps = int(t_cfg.num_steps)
  last: dict = {}
  bar = tqdm(
    total=num_steps,
    initial=start,
    desc="fastcomposer",
    disable=not (progress and is_main),
    dynamic_ncols=True,
  )
  t0 = t_last = time.perf_counter()
  s_last = start
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t0
  pending = []
  for step in range(start, num_steps):
    state, metrics = step_fn(state, parallel.to_global(get_batch(step), mesh), train_key)
    pending.append(metrics)
    done = step + 1
    if done % t_cfg.log_every == 0 or done == num_steps:
      vals = jax.device_get(pending)
      pending = []
      now = time.perf_counter()
      names = ("loss", "denoise_loss", "localization_loss", "grad_norm")
      last = {"step": done, **{m: float(np.mean([v[m] for v in vals])) for m in names}}
      last.update(
        skipped=int(vals[-1]["skipped"]),
        steps_per_sec=(done - s_last) / max(now - t_last, 1e-9),
        wall_s=wall0 + now,
      )
      t_last, s_last = now, done
      if is_main:
        log.write(last)
      bar.set_postfix(loss=f"{last['loss']:.4f}", loc=f"{last['localization_loss']:.3f}")
    bar.update(1)
    if done % t_cfg.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, state, force=True)
  bar.close()
  ckpt.close()
  return {**last, "train_s": time.perf_counter() - t0}


def load_fastcomposer(workdir: str, *, step: int | None = None, ema: bool = True) -> FastComposerRun:
  """Restores a FastComposer work directory (EMA parameters unless ``ema=False``).

  Raises:
      FileNotFoundError: If the work directory, its checkpoints or the base run are missing.
      ValueError: If ``step`` is not one of the saved steps.
  """
  config = read_config(workdir)
  base = load_base(config)
  with open(os.path.join(workdir, REFERENCE_FILE)) as f:
    ref_shape = tuple(int(v) for v in json.load(f)["reference_shape"])
  run, template, _ = build_fastcomposer(config, base, ref_shape=ref_shape, abstract=True)
  state, run.step = restore_saved(workdir, template, step=step)
  run.params = state.ema_params if ema else state.params
  return run
