"""Orbax checkpoints of the train state: kept N, saved every K steps, atomic, resumable.

Orbax writes each step to a temporary directory and renames it only once complete, so an interrupted
save never replaces or corrupts an earlier good checkpoint; ``latest_step`` only sees finished ones.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import serialization


class Checkpointer:
  """A thin wrapper around ``ocp.CheckpointManager`` for one pytree (e.g. a ``TrainState``)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1000):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
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
