"""``train_dreambooth(config, workdir)``: DreamBooth on one digit subject, resumable and data-parallel.

The run (config keys in ``configs/dreambooth.py``):

1. restores the base text-to-image model (``config.base_workdir``) and rebuilds its digit split;
2. builds the subject (:func:`build_subject`): a distinctive held-out digit of ``subject.label`` (never
   seen by the base model), ``subject.num_images`` augmented shots of it, each placed in a two-digit
   scene beside a companion digit and captioned with the identifier (``"a bwv 4 to the left of a 7"``);
3. with ``prior.weight > 0``, has the base model generate ``prior.num_images`` class images from the
   same kind of captions without the identifier (``"a 4 to the left of a 7"``), cached in
   ``prior.cache_dir`` (or the workdir);
4. fine-tunes the U-Net with :func:`diffjax.personalization.dreambooth.make_dreambooth_train_step`: every
   global batch holds ``training.instance_batch`` subject rows (cycling over the shots) and
   ``training.class_batch`` class rows, sharded along the ``data`` mesh axis.

The work directory holds ``config.json``, ``metrics.jsonl``, ``subject.npz`` (references, scenes,
prompts), ``timing.json`` and orbax checkpoints; started again on it, a run resumes (batch ``k`` and the
step key are functions of the seed and ``k``). Why scenes: the base model has only seen captions of two
digits side by side, so a one-digit prompt would be out of its distribution; the subject therefore takes
one cell and the prompt names the other digit, exactly as the base captions do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffjax import parallel
from diffjax.checkpoints import restore_or_init, restore_saved, training_checkpointer
from diffjax.data import SCENE_TEMPLATES, ImageDataset, to_model_range
from diffjax.host_memory import keep_freed_memory_on_cpu
from diffjax.latent import encode_images
from diffjax.personalization.dreambooth import make_dreambooth_train_step
from diffjax.personalization.subjects import (
  augment_digits,
  compose_scenes,
  distinctive_digit,
  subject_caption,
)
from diffjax.training import builders
from diffjax.training.personalize_common import base_data_config, base_digits, class_images, load_base
from diffjax.training.state import create_train_state
from diffjax.training.step import compile_train_step
from diffjax.training.text_builders import TextRun
from diffjax.training.workdir import MetricsLog, read_config, write_config

__all__ = ["Subject", "build_subject", "load_dreambooth", "scene_prompts", "train_dreambooth"]

TRAIN = 1  # sub-stream of the root key (as in diffjax.training.loop)


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
  """One subject and its DreamBooth training scenes.

  Attributes:
      label: The subject's digit class.
      index: Its index among the base run's held-out digits.
      identifier: The identifier word.
      references: ``uint8 [K, h, w, 1]``: the digit (first) and its augmented shots.
      scenes: ``uint8 [K, H, W, 1]``: each shot in a two-digit scene.
      masks: ``uint8 [K, H, W]``: 1 left digit, 2 right digit.
      sides: ``int32 [K]``: the subject's cell (0 left, 1 right).
      companions: ``int32 [K]``: the other cell's digit class.
      prompts: ``K`` captions with the identifier.
  """

  label: int
  index: int
  identifier: str
  references: np.ndarray
  scenes: np.ndarray
  masks: np.ndarray
  sides: np.ndarray
  companions: np.ndarray
  prompts: tuple[str, ...]

  def save(self, path: str) -> None:
    """Writes an ``.npz`` (no pickle)."""
    tmp = path + ".tmp.npz"
    np.savez(
      tmp,
      label=self.label,
      index=self.index,
      identifier=self.identifier,
      references=self.references,
      scenes=self.scenes,
      masks=self.masks,
      sides=self.sides,
      companions=self.companions,
      prompts=np.asarray(self.prompts),
    )
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> Subject:
    """Reads what :meth:`save` wrote."""
    with np.load(path, allow_pickle=False) as f:
      return cls(
        label=int(f["label"]),
        index=int(f["index"]),
        identifier=str(f["identifier"]),
        references=f["references"],
        scenes=f["scenes"],
        masks=f["masks"],
        sides=f["sides"],
        companions=f["companions"],
        prompts=tuple(str(p) for p in f["prompts"]),
      )


def build_subject(
  config: ml_collections.ConfigDict, train_digits: ImageDataset, heldout: ImageDataset, *, cell_size: int
) -> Subject:
  """The configured subject: a held-out digit, its shots, their scenes and captions.

  Raises:
      ValueError: If ``subject.index`` is out of range or not of ``subject.label``, or counts are bad.
  """
  s = config.subject
  if not 1 <= s.num_images <= 64:
    raise ValueError(f"config.subject.num_images must be in [1, 64], got {s.num_images}")
  if s.get("index") is None:
    index = distinctive_digit(heldout.images, heldout.labels, label=s.label, quantile=s.quantile)
  else:
    index = int(s.index)
    if not 0 <= index < len(heldout):
      raise ValueError(f"config.subject.index={index} is not in [0, {len(heldout)}) (held-out digits)")
    if int(heldout.labels[index]) != s.label:
      raise ValueError(
        f"held-out digit {index} is a {heldout.labels[index]}, not config.subject.label={s.label}"
      )
  k = int(s.num_images)
  refs = augment_digits(
    np.repeat(heldout.images[index : index + 1], k, axis=0),
    seed=s.seed,
    max_rotation=s.max_rotation,
    scale_range=tuple(s.scale_range),
    max_shift=s.max_shift,
    keep_first=True,
  )
  rng = np.random.default_rng([s.seed, 1])
  companion_idx = rng.integers(0, len(train_digits), size=k)
  companions = train_digits.labels[companion_idx].astype(np.int32)
  sides = (np.arange(k) % 2).astype(np.int32)
  templates = rng.integers(0, len(SCENE_TEMPLATES), size=k)
  other = train_digits.images[companion_idx]
  left = np.where(sides[:, None, None, None] == 0, refs, other)
  right = np.where(sides[:, None, None, None] == 0, other, refs)
  scenes, masks = compose_scenes(left, right, cell_size=cell_size)
  prompts = tuple(
    subject_caption(
      subject=s.label,
      other=int(c),
      subject_side=int(side),
      identifier=s.identifier,
      template=SCENE_TEMPLATES[t],
    )
    for c, side, t in zip(companions, sides, templates, strict=True)
  )
  return Subject(
    label=int(s.label),
    index=index,
    identifier=str(s.identifier),
    references=refs,
    scenes=scenes,
    masks=masks,
    sides=sides,
    companions=companions,
    prompts=prompts,
  )


def scene_prompts(
  label: int, num: int, *, seed: int, identifier: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """``num`` scene captions of digit ``label`` beside random digits, on a random side, random template.

  Without ``identifier`` these are DreamBooth's class prompts (and the language-drift probes); with it,
  the subject prompts of the same scenes (same seed, same others, sides and templates).

  Returns:
      ``(prompts, others int32 [num], sides int32 [num], template_ids int32 [num])``: the other cell's digit,
      the subject's cell (0 left, 1 right) and the index into ``SCENE_TEMPLATES``.
  """
  rng = np.random.default_rng([seed, label, 2])
  others = rng.integers(0, 10, size=num).astype(np.int32)
  sides = rng.integers(0, 2, size=num).astype(np.int32)
  templates = rng.integers(0, len(SCENE_TEMPLATES), size=num).astype(np.int32)
  prompts = [
    subject_caption(
      subject=label, other=int(o), subject_side=int(s), identifier=identifier, template=SCENE_TEMPLATES[t]
    )
    for o, s, t in zip(others, sides, templates, strict=True)
  ]
  return prompts, others, sides, templates


def _to_x0(run: TextRun, images: np.ndarray) -> np.ndarray:
  return encode_images(run.codec, images) if run.codec is not None else to_model_range(images)


def train_dreambooth(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """Fine-tunes (or resumes) the base model on the configured subject; returns the last metrics.

  The result also carries ``train_s`` (seconds of fine-tuning, compilation included) and
  ``class_images_s`` (seconds the base model spent generating class images; 0 when cached).

  Raises:
      ValueError: On inconsistent settings.
      FileNotFoundError: If the base work directory or the digits are missing.
  """
  keep_freed_memory_on_cpu()  # reuse the step's freed temporaries (diffjax.host_memory)
  t_cfg, p_cfg = config.training, config.prior
  prior_weight = float(p_cfg.weight)
  n_inst = int(t_cfg.instance_batch)
  n_class = int(t_cfg.class_batch) if prior_weight > 0 else 0
  if n_inst < 1 or (prior_weight > 0 and n_class < 1):
    raise ValueError(
      f"training.instance_batch (and class_batch with a prior) must be >= 1, got {n_inst}, {n_class}"
    )
  mesh = parallel.make_mesh(config.mesh.num_devices)
  parallel.check_batch_size(n_inst + n_class, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(workdir, config)

  base = load_base(config)
  base_config = base_data_config(base.config, config.get("data_path"))
  train_digits, heldout = base_digits(base_config)
  subject = build_subject(config, train_digits, heldout, cell_size=int(base_config.data.cell_size))
  if is_main:
    subject.save(os.path.join(workdir, "subject.npz"))

  x_inst = _to_x0(base, subject.scenes)
  c_inst = base.prompts.encode(list(subject.prompts))
  class_s = 0.0
  if n_class:
    prompts = scene_prompts(subject.label, int(p_cfg.num_images), seed=config.seed)[0]
    images, class_s = class_images(
      base,
      prompts,
      guidance=p_cfg.guidance,
      num_steps=p_cfg.num_steps,
      batch_size=p_cfg.batch_size,
      seed=config.seed,
      cache_dir=p_cfg.get("cache_dir") or workdir,
    )
    x_class = _to_x0(base, images)
    c_class = base.prompts.encode(prompts)

  tx = builders.build_optimizer(config)
  rep = parallel.replicated(mesh)
  ckpt = training_checkpointer(workdir, t_cfg)
  state, start = restore_or_init(
    ckpt, init=lambda: jax.device_put(create_train_state(params=base.params, tx=tx), rep)
  )
  log = MetricsLog(workdir, resume_step=start)
  d_cfg = base.config.diffusion
  step_fn = compile_train_step(
    make_dreambooth_train_step(
      unet=base.unet,
      schedule=base.schedule,
      tx=tx,
      null_cond=base.prompts.null_condition(),
      prior_weight=prior_weight,
      prediction=d_cfg.prediction,
      weighting=d_cfg.weighting,
      min_snr_gamma=d_cfg.min_snr_gamma,
      cond_drop_prob=t_cfg.cond_drop_prob,
      ema_decay=t_cfg.ema_decay,
    ),
    mesh,
  )
  train_key = jax.device_put(jax.random.fold_in(jax.random.key(config.seed), TRAIN), rep)
  global_batch = n_inst + n_class
  local = global_batch // jax.process_count()
  lo = jax.process_index() * local
  k = len(subject.prompts)

  def get_batch(step: int) -> dict:
    inst = (step * n_inst + np.arange(n_inst)) % k
    batch = {
      "x0": x_inst[inst],
      "tokens": c_inst[0][inst],
      "mask": c_inst[1][inst],
      "prior": np.zeros(n_inst, np.int32),
    }
    if n_class:
      rows = np.random.default_rng([config.seed, step]).integers(0, x_class.shape[0], size=n_class)
      part = {
        "x0": x_class[rows],
        "tokens": c_class[0][rows],
        "mask": c_class[1][rows],
        "prior": np.ones(n_class, np.int32),
      }
      batch = {key: np.concatenate([batch[key], part[key]]) for key in batch}
    return {key: v[lo : lo + local] for key, v in batch.items()}

  num_steps = int(t_cfg.num_steps)
  last: dict = {}
  bar = tqdm(
    total=num_steps, initial=start, desc="dreambooth", disable=not (progress and is_main), dynamic_ncols=True
  )
  t0 = time.perf_counter()
  pending = []
  for step in range(start, num_steps):
    state, metrics = step_fn(state, parallel.to_global(get_batch(step), mesh), train_key)
    pending.append(metrics)
    done = step + 1
    if done % t_cfg.log_every == 0 or done == num_steps:
      vals = jax.device_get(pending)
      pending = []
      last = {
        "step": done,
        **{
          m: float(np.mean([v[m] for v in vals]))
          for m in ("loss", "instance_loss", "prior_loss", "grad_norm")
        },
      }
      last["skipped"] = int(vals[-1]["skipped"])
      if is_main:
        log.write(last)
      bar.set_postfix(loss=f"{last['loss']:.4f}")
    bar.update(1)
    if done % t_cfg.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, state, force=True)
  bar.close()
  jax.block_until_ready(state)
  ckpt.close()
  timing = {"train_s": time.perf_counter() - t0, "class_images_s": class_s, "steps_run": num_steps - start}
  if is_main:
    with open(os.path.join(workdir, "timing.json"), "w") as f:
      json.dump(timing, f)
  return {**last, **timing}


def load_dreambooth(workdir: str, *, step: int | None = None) -> tuple[TextRun, Subject]:
  """The fine-tuned model of a DreamBooth work directory (a :class:`TextRun`) and its subject.

  Raises:
      FileNotFoundError: If the work directory, its checkpoints or the base run are missing.
      ValueError: If ``step`` is not one of the saved steps.
  """
  config = read_config(workdir)
  subject_path = os.path.join(workdir, "subject.npz")
  if not os.path.isfile(subject_path):
    raise FileNotFoundError(f"{workdir!r} has no subject.npz: not a DreamBooth work directory")
  run = load_base(config)
  tx = builders.build_optimizer(config)
  template = jax.eval_shape(lambda p: create_train_state(params=p, tx=tx), run.params)
  state, step = restore_saved(workdir, template, step=step)
  run = dataclasses.replace(run, params=state.params, step=step)
  return run, Subject.load(subject_path)
