"""Orbax checkpoints of the train state: kept N, saved every K steps, atomic, resumable.

Orbax writes each step to a temporary directory and renames it only once complete, so an interrupted
save never replaces or corrupts an earlier good checkpoint; ``latest_step`` only sees finished ones.
:func:`training_checkpointer` opens a run's ``checkpoints/`` and :func:`restore_or_init` starts every
training loop: from the latest checkpoint when there is one, else from a fresh state.
:func:`restore_saved` is the loading side (sampling, evaluation, a teacher or base model): the latest or
a chosen step of a finished run, with one clear error when there is none.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import serialization


class Checkpointer:
  """A thin wrapper around ``ocp.CheckpointManager`` for one pytree (e.g. a ``TrainState``)."""

  def __init__(
    self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1000, create: bool = True
  ):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if the interval says so (or ``force``); returns whether it did."""
    return self._manager.save(
      int(step), args=ocp.args.StandardSave(serialization.to_state_dict(state)), force=force
    )

  def restore(self, template, step: int | None = None):
    """Restores into the structure, shapes, dtypes and shardings of ``template``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory!r}")
    target = serialization.to_state_dict(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(abstract))
    return serialization.from_state_dict(template, restored)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def training_checkpointer(workdir: str, training) -> Checkpointer:
  """The ``checkpoints/`` of a run's work directory, kept and spaced as the run's config says.

  Args:
    workdir: the run's work directory.
    training: the config's ``training`` block (``keep_checkpoints``, ``checkpoint_every``).

  Returns:
    A :class:`Checkpointer` of ``workdir/checkpoints``.
  """
  return Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=training.keep_checkpoints,
    save_interval_steps=training.checkpoint_every,
  )


def restore_or_init(
  ckpt: Checkpointer,
  *,
  init: Callable[[], Any],
  template: Callable[[], Any] | None = None,
  sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, int]:
  """The latest checkpoint's train state and its step, or a fresh state and step 0.

  How every training loop starts: a run started again on the same work directory continues from its
  latest finished checkpoint (and, since batch ``k`` and the step keys depend only on the seed and ``k``,
  continues exactly as an uninterrupted run would).

  Args:
    ckpt: the run's checkpointer.
    init: ``() -> state``, the fresh state (a pytree with an int ``step``). Called when there is no
      checkpoint, and for the restore template when ``template`` is None.
    template: optional ``() -> pytree`` shaped like the state (arrays or ``jax.ShapeDtypeStruct``, e.g.
      ``jax.eval_shape`` of the initialiser), restored into instead of calling ``init``.
    sharding: optional placement of every restored leaf, replacing the template's own.

  Returns:
    ``(state, start)``: ``start`` is the restored ``state.step``, or 0 for a fresh state.
  """
  if ckpt.latest_step() is None:
    return init(), 0
  target = init() if template is None else template()
  state = ckpt.restore(_placed(target, sharding))
  return state, int(jax.device_get(state.step))


def _placed(template, sharding: jax.sharding.Sharding | None):
  """``template`` as shapes and dtypes placed on ``sharding`` (unchanged when it is None)."""
  if sharding is None:
    return template
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), template)


def checkpoint_dir(path: str) -> str:
  """Where the checkpoints of ``path`` are: its ``checkpoints/`` if it has one, else ``path`` itself.

  Args:
    path: a run's work directory or a checkpoints directory.
  """
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def saved_steps(path: str) -> list[int]:
  """The finished checkpoint steps of ``path`` (see :func:`checkpoint_dir`), ascending; creates nothing.

  Args:
    path: a run's work directory or a checkpoints directory.

  Returns:
    The steps, or ``[]`` when there are none (or ``path`` does not exist). Saves still in progress
    (orbax's temporary directories) are not listed.
  """
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    return []
  ckpt = Checkpointer(directory, create=False)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def restore_saved(
  path: str,
  template: Any,
  *,
  step: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
  what: str = "checkpoint step",
) -> tuple[Any, int]:
  """A saved state of a run, restored for use (sampling, evaluation, a teacher): latest step by default.

  The loading-side counterpart of :func:`restore_or_init`: nothing is created, deleted or saved, and a
  missing checkpoint is an error rather than a fresh start.

  Args:
    path: a run's work directory (its ``checkpoints/`` is read) or a checkpoints directory.
    template: a pytree shaped like the saved state (arrays or ``jax.ShapeDtypeStruct``, e.g.
      ``jax.eval_shape`` of the initialiser); the restored state has its structure and dtypes.
    step: the step to restore; None for the latest.
    sharding: optional placement of every restored leaf, replacing the template's own.
    what: how the requested step is named in the error (e.g. ``"--checkpoint-step"`` for a flag).

  Returns:
    ``(state, step)``: the restored state and the step it was saved at.

  Raises:
    FileNotFoundError: ``path`` holds no finished checkpoint (the message names the directory).
    ValueError: ``step`` is not one of the saved steps (the message lists those that are).
  """
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint found: {path!r} is not a directory")
  ckpt = Checkpointer(directory, create=False)
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      where = repr(directory) if directory != path else f"{path!r} (it has no checkpoints/ directory)"
      raise FileNotFoundError(f"no checkpoint found in {where}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"{what} {step} not found in {directory!r}; available: {steps}")
    return ckpt.restore(_placed(template, sharding), step=int(step)), int(step)
  finally:
    ckpt.close()
