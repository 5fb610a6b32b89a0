"""``run_distillation(config, teacher_workdir, workdir)``: halving after halving, each a resumable stage.

The plan for ``start_steps = 64, end_steps = 1`` is six progressive stages, the students of 32, 16, 8, 4,
2 and 1 steps; with ``distill.guided`` a guided stage (Meng et al. 2023, stage one) comes first and the
progressive stages distill its w-conditioned student. Each stage lives in its own subdirectory of the work
directory (``stage_guided``, ``stage_032``, ..., ``stage_001``) holding config.json, metrics.jsonl, orbax
checkpoints and a sample grid. The teacher of a stage is the final student of the one before (the
trained model of ``teacher_workdir`` for the first), and its student starts as a copy of that teacher
(Salimans & Ho 2022, Sec. 4). The student's EMA is off by default (``ema_decay = 0``, as in the paper's
configs), and a stage hands its ``ema_params`` on, which then equal its raw parameters.

A finished stage (its latest checkpoint at the stage's step count) is skipped on a rerun; a stage stopped
mid-way resumes from its latest checkpoint exactly: batch k is a pure function of (seed, stage, k) and the
step key is ``fold_in(stage_key, step)``.
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
from diffjax.checkpoints import restore_or_init, restore_saved, saved_steps, training_checkpointer
from diffjax.data import Prefetcher, to_uint8
from diffjax.distillation.guided import (
  guided_cond_fn,
  init_guided_student,
  make_guided_model_fn,
  make_guided_step,
)
from diffjax.distillation.progressive import make_progressive_step
from diffjax.distillation.sampling import make_student_generate
from diffjax.images import save_image_grid
from diffjax.models import UNet
from diffjax.training import builders
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.step import make_model_fn
from diffjax.training.workdir import MetricsLog, read_config, write_config

GUIDED_STAGE = "stage_guided"


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: ``kind`` "guided" (stage one of guided distillation) or "progressive" (one halving).

  ``student_steps`` is the student's sampling step count (for "guided": the step count of its grid, the
  start of the halvings); ``teacher`` the name of the stage whose student teaches this one, or "base".
  """

  name: str
  kind: str
  student_steps: int
  num_steps: int
  teacher: str
  seed_offset: int


def stage_plan(config: ml_collections.ConfigDict, *, num_timesteps: int) -> list[Stage]:
  """The stages of ``config.distill`` in order; checks that start/end steps are halvings of each other."""
  d = config.distill
  start, end = int(d.start_steps), int(d.end_steps)
  if end < 1 or start < end or start % end or (start // end) & (start // end - 1):
    raise ValueError(f"distill.start_steps / end_steps must be a power of two >= 1, got {start} / {end}")
  if start > num_timesteps:
    raise ValueError(f"distill.start_steps={start} exceeds the schedule's T={num_timesteps}")
  stages, teacher = [], "base"
  if d.guided:
    if d.guided_steps < 1:
      raise ValueError(f"distill.guided_steps must be >= 1 for guided distillation, got {d.guided_steps}")
    stages.append(Stage(GUIDED_STAGE, "guided", start, int(d.guided_steps), teacher, 0))
    teacher = GUIDED_STAGE
  n = start // 2
  while n >= end:
    stages.append(Stage(f"stage_{n:03d}", "progressive", n, int(d.steps_per_stage), teacher, len(stages)))
    teacher, n = stages[-1].name, n // 2
  return stages


def student_model(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict) -> UNet:
  """The teacher's U-Net with ``config.student`` overrides (dropout) and, if guided, the w embedding."""
  kwargs = teacher_config.model.to_dict()
  kwargs.update(config.student.to_dict())
  kwargs["guidance_embedding"] = bool(config.distill.guided)
  return UNet(**kwargs)


def stage_optimizer(config: ml_collections.ConfigDict, *, num_steps: int):
  """AdamW of ``config.training``; the learning-rate schedule (warm-up, decay) spans one stage."""
  t = config.training
  return make_optimizer(
    learning_rate=t.learning_rate,
    warmup_steps=t.warmup_steps,
    total_steps=num_steps,
    decay=t.lr_decay,
    weight_decay=t.weight_decay,
    grad_clip=t.grad_clip,
  )


def restore_final_params(ckpt_dir: str, *, model: UNet, tx, image_shape, step: int | None = None):
  """The EMA parameters of the train state saved in ``ckpt_dir`` (default: its latest step).

  The restore template comes from ``jax.eval_shape`` (shapes only, placed on the default device), so no
  initialisation is compiled or run: restoring is as cheap as reading the checkpoint.

  Raises:
    FileNotFoundError: If ``ckpt_dir`` holds no checkpoint.
    ValueError: If ``step`` is not one of the saved steps.
  """
  x, t = np.zeros((1, *image_shape), np.float32), np.zeros((1,), np.int32)
  y = None if model.num_classes is None else np.zeros((1,), np.int32)
  kw = {"guidance": np.ones((1,), np.float32)} if getattr(model, "guidance_embedding", False) else {}

  def init(key):
    return create_train_state(params=model.init({"params": key}, x, t, y, **kw)["params"], tx=tx)

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, _ = restore_saved(ckpt_dir, jax.eval_shape(init, jax.random.key(0)), step=step, sharding=device)
  return state.ema_params


def _fresh(tree, sharding):
  """A copy in new device buffers (the student's state is donated; the teacher's must survive)."""
  return jax.device_put(jax.tree.map(np.array, jax.device_get(tree)), sharding)


class _Run:
  """What every stage shares: config, data, models, mesh, keys."""

  def __init__(self, config, teacher_workdir: str, workdir: str, progress: bool):
    self.config, self.workdir, self.progress = config, workdir, progress
    self.teacher_workdir = teacher_workdir
    self.teacher_config = tc = read_config(teacher_workdir)
    self.prediction = tc.diffusion.prediction
    if self.prediction not in ("v", "x0"):
      raise ValueError(
        f"the teacher in {teacher_workdir!r} predicts {self.prediction!r}: progressive distillation needs a "
        "v- or x0-prediction teacher (x0 = (z - sigma eps) / alpha is ill-posed at the one-step limit)"
      )
    self.teacher_model, self.schedule = builders.build_model(tc), builders.build_schedule(tc)
    if config.distill.guided and self.teacher_model.num_classes is None:
      raise ValueError("guided distillation needs a class-conditional teacher (model.num_classes set)")
    self.model = student_model(config, tc)
    self.shape = builders.image_shape(tc)
    self.train_ds, _ = builders.load_data(tc)
    self.mesh = parallel.make_mesh(config.mesh.num_devices)
    parallel.check_batch_size(config.training.batch_size, self.mesh)
    self.rep, self.dat = parallel.replicated(self.mesh), parallel.data_sharded(self.mesh)
    self.root = jax.random.key(config.seed)
    self.base_params = restore_final_params(
      os.path.join(teacher_workdir, "checkpoints"),
      model=self.teacher_model,
      tx=builders.build_optimizer(tc),
      image_shape=self.shape,
    )

  def optimizer(self, stage: Stage):
    return stage_optimizer(self.config, num_steps=stage.num_steps)

  def step_fn(self, stage: Stage, tx):
    d, t = self.config.distill, self.config.training
    guided = bool(d.guided)
    if guided:
      student = lambda k: make_guided_model_fn(self.model, train=True, dropout_key=k)
    else:
      student = lambda k: make_model_fn(self.model, train=True, dropout_key=k)
    common = {"student_fn": student, "schedule": self.schedule, "tx": tx, "weighting": d.weighting}
    common.update(
      student_prediction=self.prediction, teacher_prediction=self.prediction, ema_decay=t.ema_decay
    )
    if stage.kind == "guided":
      return make_guided_step(
        teacher_fn=make_model_fn(self.teacher_model, train=False),
        null_label=self.teacher_model.null_label,
        w_min=d.w_min,
        w_max=d.w_max,
        **common,
      )
    if guided:
      teacher_fn, cond_fn = make_guided_model_fn(self.model), guided_cond_fn(w_min=d.w_min, w_max=d.w_max)
    else:
      teacher_model = self.teacher_model if stage.teacher == "base" else self.model
      teacher_fn = make_model_fn(teacher_model, train=False)
      conditional = self.model.num_classes is not None
      cond_fn = lambda batch, key: batch["label"] if conditional else None
    return make_progressive_step(
      teacher_fn=teacher_fn, cond_fn=cond_fn, num_student_steps=stage.student_steps, **common
    )

  def stage_config(self, stage: Stage) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.stage = ml_collections.ConfigDict(dataclasses.asdict(stage))
    c.stage.teacher_workdir = self.teacher_workdir
    c.stage.forward_passes_per_sample = stage.student_steps
    return c


def _sample_grid(run: _Run, stage: Stage, params, path: str) -> str | None:
  nc = run.model.num_classes
  if not (run.config.sample.num and nc):
    return None
  generate = make_student_generate(
    model=run.model, schedule=run.schedule, image_shape=run.shape, prediction=run.prediction
  )
  labels = np.arange(run.config.sample.num) % nc
  w = run.config.sample.guidance if run.config.distill.guided else 1.0
  imgs = generate(
    params, jax.random.fold_in(run.root, 10**6), labels, num_steps=stage.student_steps, guidance=w
  )
  save_image_grid(to_uint8(np.asarray(jax.device_get(imgs))), path, nrow=nc)
  return path


def _run_stage(run: _Run, stage: Stage, *, teacher_params, budget: list) -> tuple[object, dict]:
  """Trains (or resumes, or skips) one stage; returns (final student params, summary)."""
  t_cfg = run.config.training
  stage_dir = os.path.join(run.workdir, stage.name)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(stage_dir, run.stage_config(stage))
  tx = run.optimizer(stage)
  if stage.kind == "guided":
    init = init_guided_student(
      student_model=run.model,
      teacher_params=teacher_params,
      key=jax.random.fold_in(run.root, 10**6 + 1),
      image_shape=run.shape,
    )
  else:
    init = teacher_params
  ckpt = training_checkpointer(stage_dir, t_cfg)
  new_state = jax.jit(lambda p: create_train_state(params=p, tx=tx), out_shardings=run.rep)
  state, start = restore_or_init(ckpt, init=lambda: new_state(_fresh(init, run.rep)))
  log = MetricsLog(stage_dir, resume_step=start)
  summary = {"stage": stage.name, "kind": stage.kind, "student_steps": stage.student_steps}
  if start >= stage.num_steps:
    ckpt.close()
    last = [r for r in log.read() if "loss" in r]
    summary.update(skipped=True, **({"loss": last[-1]["loss"], "wall_s": last[-1]["wall_s"]} if last else {}))
    return state.ema_params, summary

  step_fn = jax.jit(
    run.step_fn(stage, tx),
    in_shardings=(run.rep, run.dat, run.rep, run.rep),
    out_shardings=(run.rep, run.rep),
    donate_argnums=(0,),
  )
  teacher = jax.device_put(teacher_params, run.rep)
  key = jax.device_put(jax.random.fold_in(run.root, stage.seed_offset), run.rep)
  bar = tqdm(
    total=stage.num_steps,
    initial=start,
    desc=stage.name,
    disable=not (run.progress and is_main),
    dynamic_ncols=True,
  )
  t_last, s_last = time.perf_counter(), start
  wall0 = max([r.get("wall_s", 0.0) for r in log.read()] + [0.0]) - t_last
  pending, done, last = [], start, {}
  with Prefetcher(
    run.train_ds,
    start_step=start,
    seed=run.config.seed + 1 + stage.seed_offset,
    global_batch_size=t_cfg.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ) as batches:
    for step, local in batches:
      if step >= stage.num_steps or (budget[0] is not None and budget[0] <= 0):
        break
      state, metrics = step_fn(state, parallel.to_global(local, run.mesh), key, teacher)
      if budget[0] is not None:
        budget[0] -= 1
      pending.append(metrics)
      done = step + 1
      if done % t_cfg.log_every == 0 or done == stage.num_steps:
        now = time.perf_counter()
        vals, pending = jax.device_get(pending), []
        rate = (done - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, done
        last = {
          "step": done,
          "loss": float(np.mean([v["loss"] for v in vals])),
          "grad_norm": float(np.mean([v["grad_norm"] for v in vals])),
          "skipped": int(vals[-1]["skipped"]),
          "steps_per_sec": rate,
          "wall_s": wall0 + now,
        }
        if is_main:
          log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{rate:.1f}")
      bar.update(1)
      if done % t_cfg.checkpoint_every == 0 or done == stage.num_steps:
        ckpt.save(done, state, force=True)
  bar.close()
  ckpt.close()
  summary.update(skipped=False, step=done, **{k: last[k] for k in ("loss", "wall_s") if k in last})
  if done < stage.num_steps:
    summary["interrupted"] = True
    return None, summary
  if is_main:
    grid = _sample_grid(run, stage, state.ema_params, os.path.join(stage_dir, "samples.png"))
    summary.update({"sample_grid": grid} if grid else {})
  return state.ema_params, summary


def run_distillation(
  config: ml_collections.ConfigDict,
  *,
  teacher_workdir: str,
  workdir: str,
  progress: bool = True,
  max_train_steps: int | None = None,
) -> list[dict]:
  """Runs (or resumes) every stage of ``config`` in ``workdir``; returns one summary dict per stage run.

  Args:
    config: a distillation config (``configs/digits_distill.py``).
    teacher_workdir: work directory of the trained teacher (``python -m diffjax train``).
    workdir: where the stages live; rerun on the same directory to resume.
    progress: show a progress bar per stage.
    max_train_steps: stop, as if interrupted, after this many optimisation steps in this call (tests and
      time-sliced runs); None runs to the end.
  """
  run = _Run(config, teacher_workdir, workdir, progress)
  if jax.process_index() == 0:
    c = ml_collections.ConfigDict(config.to_dict())
    c.teacher_workdir = teacher_workdir
    c.teacher_config = run.teacher_config
    write_config(workdir, c)
  params, summaries = {"base": run.base_params}, []
  budget = [max_train_steps]
  for stage in stage_plan(config, num_timesteps=run.schedule.num_timesteps):
    student, summary = _run_stage(run, stage, teacher_params=params[stage.teacher], budget=budget)
    summaries.append(summary)
    if student is None:
      break
    params[stage.name] = student
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summaries, f, indent=2)
  return summaries


def load_stage(workdir: str, name: str):
  """Restores the final student of stage ``name`` of a distillation work directory.

  Returns:
    (model, schedule, params, stage config): the student's U-Net, the schedule, its final (EMA)
    parameters and the stage's config (``.stage.student_steps`` is its sampling step count).
  """
  top = read_config(workdir)
  stage_dir = os.path.join(workdir, name)
  cfg = read_config(stage_dir)
  model = student_model(top, top.teacher_config)
  schedule = builders.build_schedule(top.teacher_config)
  shape = builders.image_shape(top.teacher_config)
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  steps = saved_steps(ckpt_dir)
  if not steps or steps[-1] != cfg.stage.num_steps:
    latest = steps[-1] if steps else None
    raise FileNotFoundError(f"stage {name!r} in {workdir!r} is not finished (latest checkpoint {latest})")
  tx = stage_optimizer(top, num_steps=int(cfg.stage.num_steps))
  params = restore_final_params(ckpt_dir, model=model, tx=tx, image_shape=shape)
  return model, schedule, params, cfg


def stage_names(workdir: str) -> list[str]:
  """Names of the finished-or-not stages planned by the distillation config in ``workdir``."""
  top = read_config(workdir)
  T = int(top.teacher_config.diffusion.num_timesteps)
  return [s.name for s in stage_plan(top, num_timesteps=T)]
