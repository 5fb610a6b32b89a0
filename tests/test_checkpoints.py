"""restore_or_init and training_checkpointer: how every training loop starts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffjax.checkpoints import restore_or_init, training_checkpointer
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
