"""bfloat16 compute and rematerialisation reach the model from the config and train finitely."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import parallel
from diffjax.training import builders
from diffjax.training.state import create_train_state
from diffjax.training.step import compile_train_step, make_train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
from ddpm_defaults import base_config, smoke


def test_bfloat16_remat_config_trains_with_float32_state():
  config = smoke(base_config())
  config.model.update(dtype="bfloat16", remat=True)
  model = builders.build_model(config)
  assert jnp.dtype(model.dtype) == jnp.bfloat16 and model.remat
  shape = builders.image_shape(config)
  tx = builders.build_optimizer(config)
  params = builders.init_params(model, key=jax.random.key(0), shape=shape)
  state = create_train_state(params=params, tx=tx)
  mesh = parallel.make_mesh(1)
  step = compile_train_step(
    make_train_step(model=model, schedule=builders.build_schedule(config), tx=tx), mesh
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.uniform(-1, 1, (8, *shape)).astype(np.float32)),
    "label": jnp.asarray(rng.integers(0, 10, 8).astype(np.int32)),
  }
  for _ in range(3):
    state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(1))
  assert int(state.step) == 3 and int(state.skipped) == 0
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    assert new.dtype == jnp.float32 and new.shape == old.shape
    assert bool(jnp.all(jnp.isfinite(new)))
