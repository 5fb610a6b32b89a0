"""restore_or_init and training_checkpointer (how every training loop starts) and restore_saved (loading)."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffjax.checkpoints import restore_or_init, restore_saved, saved_steps, training_checkpointer
from diffjax.training.state import create_train_state

TRAINING = ml_collections.ConfigDict({"keep_checkpoints": 2, "checkpoint_every": 5})


def _state(value: float, step: int = 0):
  state = create_train_state(params={"w": jnp.full((3,), value, jnp.float32)}, tx=optax.sgd(0.1))
  return state.replace(step=jnp.asarray(step, jnp.int32))


def test_fresh_without_a_checkpoint_then_the_latest_one(tmp_path):
  ckpt = training_checkpointer(str(tmp_path), TRAINING)
  assert ckpt.directory == str(tmp_path / "checkpoints")
  calls = []

  def init():
    calls.append(1)
    return _state(1.0)

  state, start = restore_or_init(ckpt, init=init)
  assert start == 0 and len(calls) == 1
  np.testing.assert_array_equal(state.params["w"], 1.0)

  assert ckpt.save(5, _state(2.0, step=5))
  assert not ckpt.save(6, _state(2.5, step=6))  # the config's interval (every 5 steps)
  ckpt.save(7, _state(3.0, step=7), force=True)
  ckpt.wait()
  state, start = restore_or_init(ckpt, init=init)  # init() is the restore template
  assert start == 7 and int(state.step) == 7 and len(calls) == 2
  np.testing.assert_array_equal(state.params["w"], 3.0)
  ckpt.close()


def test_restores_into_a_shapes_only_template_without_init(tmp_path):
  ckpt = training_checkpointer(str(tmp_path), TRAINING)
  ckpt.save(4, _state(5.0, step=4), force=True)
  ckpt.wait()

  def init():
    raise AssertionError("init must not run when a template is given and a checkpoint exists")

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state, start = restore_or_init(
    ckpt, init=init, template=lambda: jax.eval_shape(lambda: _state(0.0)), sharding=sharding
  )
  assert start == 4
  np.testing.assert_array_equal(state.params["w"], 5.0)
  assert isinstance(state.params["w"], jax.Array) and state.params["w"].sharding == sharding
  ckpt.close()


def test_bad_checkpointer_settings_are_clear_errors(tmp_path):
  bad = ml_collections.ConfigDict({"keep_checkpoints": 0, "checkpoint_every": 5})
  with pytest.raises(ValueError, match="max_to_keep"):
    training_checkpointer(str(tmp_path), bad)


@pytest.fixture
def saved_run(tmp_path):
  """A work directory with finished checkpoints at steps 5 and 10 (w = 2 and 3)."""
  ckpt = training_checkpointer(str(tmp_path), TRAINING)
  ckpt.save(5, _state(2.0, step=5), force=True)
  ckpt.save(10, _state(3.0, step=10), force=True)
  ckpt.close()
  return str(tmp_path)


def test_restore_saved_latest_or_chosen_step_from_a_workdir_or_its_checkpoints(saved_run):
  template = jax.eval_shape(lambda: _state(0.0))
  state, step = restore_saved(saved_run, template)
  assert step == 10 and int(state.step) == 10
  np.testing.assert_array_equal(state.params["w"], 3.0)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt_dir = os.path.join(saved_run, "checkpoints")
  state, step = restore_saved(ckpt_dir, template, step=5, sharding=sharding)
  assert step == 5 and int(state.step) == 5 and state.params["w"].sharding == sharding
  np.testing.assert_array_equal(state.params["w"], 2.0)
  assert saved_steps(saved_run) == saved_steps(ckpt_dir) == [5, 10]


def test_restore_saved_missing_step_lists_the_available_ones(saved_run):
  template = jax.eval_shape(lambda: _state(0.0))
  needle = r"^--checkpoint-step 7 not found in '.*checkpoints'; available: \[5, 10\]$"
  with pytest.raises(ValueError, match=needle):
    restore_saved(saved_run, template, step=7, what="--checkpoint-step")
  with pytest.raises(ValueError, match=r"^checkpoint step 7 not found .*; available: \[5, 10\]$"):
    restore_saved(saved_run, template, step=7)


def test_restore_saved_without_checkpoints_names_the_directory_and_creates_nothing(tmp_path):
  template = jax.eval_shape(lambda: _state(0.0))
  missing = str(tmp_path / "missing")
  needle = re.escape(f"no checkpoint found: '{missing}' is not a directory")
  with pytest.raises(FileNotFoundError, match=needle):
    restore_saved(missing, template)
  assert not os.path.exists(missing) and saved_steps(missing) == []
  workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="it has no checkpoints/ directory"):
    restore_saved(workdir, template)
  os.makedirs(tmp_path / "checkpoints")
  needle = re.escape(f"no checkpoint found in '{workdir}/checkpoints'") + "$"
  with pytest.raises(FileNotFoundError, match=needle):
    restore_saved(workdir, template)
