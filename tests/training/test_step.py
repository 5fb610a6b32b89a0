import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import parallel
from diffjax.data import get_batch, load_digits, split_holdout, to_model_range
from diffjax.models import UNet
from diffjax.schedules import make_schedule
from diffjax.training.builders import init_params
from diffjax.training.loop import make_eval_bpd
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.step import compile_train_step, make_train_step

MODEL = UNet(
  block_out_channels=(16, 32),
  layers_per_block=1,
  attention_levels=(False, True),
  attention_head_dim=8,
  norm_num_groups=4,
  dropout=0.0,
  num_classes=10,
)
SCHEDULE = make_schedule("linear", num_timesteps=100)
TX = make_optimizer(learning_rate=2e-3, warmup_steps=5)


def _state():
  return create_train_state(params=init_params(MODEL, key=jax.random.key(0), shape=(8, 8, 1)), tx=TX)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_jit_and_eager_step_agree():
  step = make_train_step(model=MODEL, schedule=SCHEDULE, tx=TX)
  batch = jax.tree.map(jnp.asarray, get_batch(load_digits(), step=0, seed=0, global_batch_size=16))
  key = jax.random.key(3)
  s_eager, m_eager = step(_state(), batch, key)
  s_jit, m_jit = jax.jit(step)(_state(), batch, key)
  assert _max_diff(s_eager.params, s_jit.params) < 1e-5
  np.testing.assert_allclose(m_eager["loss"], m_jit["loss"], rtol=1e-5)


def test_loss_and_heldout_bits_per_dim_fall_on_digits():
  train, heldout = split_holdout(load_digits(), holdout=64, seed=0)
  mesh = parallel.make_mesh(1)
  step = compile_train_step(make_train_step(model=MODEL, schedule=SCHEDULE, tx=TX), mesh)
  eval_bpd = make_eval_bpd(model=MODEL, schedule=SCHEDULE, prediction="eps", num_t_samples=20)
  images, labels = jnp.asarray(to_model_range(heldout.images)), jnp.asarray(heldout.labels)
  state, key, losses = _state(), jax.random.key(1), []
  bpd = [float(jnp.mean(eval_bpd(state.params, images, labels, jax.random.key(7))))]
  for s in range(1, 201):
    batch = parallel.to_global(get_batch(train, step=s, seed=0, global_batch_size=64), mesh)
    state, m = step(state, batch, key)
    losses.append(m["loss"])
    if s % 100 == 0:
      bpd.append(float(jnp.mean(eval_bpd(state.params, images, labels, jax.random.key(7)))))
  losses = np.asarray(jax.device_get(losses))
  assert np.all(np.isfinite(losses)) and np.all(np.isfinite(bpd))
  assert losses[-25:].mean() < 0.5 * losses[:10].mean(), (losses[:10].mean(), losses[-25:].mean())
  assert bpd[2] < bpd[1] < bpd[0], bpd


def test_non_finite_update_is_skipped_and_counted():
  step = jax.jit(make_train_step(model=MODEL, schedule=SCHEDULE, tx=TX))
  batch = jax.tree.map(jnp.asarray, get_batch(load_digits(), step=0, seed=0, global_batch_size=8))
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
  state = _state()
  new, m = step(state, bad, jax.random.key(0))
  assert int(new.skipped) == 1 and int(new.step) == 1
  assert _max_diff(new.params, state.params) == 0.0
  # The optimiser state was not advanced either: the warm-up still starts at learning rate 0, so it
  # takes two good steps to move the parameters.
  good, _ = step(new, batch, jax.random.key(0))
  good, _ = step(good, batch, jax.random.key(1))
  assert int(good.skipped) == 1 and int(good.step) == 3 and _max_diff(good.params, state.params) > 0


def test_eight_devices_equal_one_device():
  script = os.path.join(os.path.dirname(__file__), "step_equivalence.py")
  env = dict(os.environ)
  # The script adds its own device count; keep the suite's other XLA flags (tests/conftest.py).
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  )
  res = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["step"] == 2
  assert out["params"] < 1e-5 and out["ema"] < 1e-5 and out["loss"] < 1e-5, out
