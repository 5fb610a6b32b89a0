"""Progressive distillation: grids, the one-step target, the loss and its training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import diffusion
from diffjax.data import get_batch, load_digits
from diffjax.distillation import (
  make_progressive_step,
  one_step_target,
  progressive_distillation_loss,
  step_triplets,
  student_grid,
  teacher_two_steps,
)
from diffjax.distillation.progressive import ddim_update
from diffjax.models import UNet
from diffjax.samplers import ddim_sample
from diffjax.samplers.timesteps import make_timesteps
from diffjax.schedules import make_schedule
from diffjax.training.builders import init_params
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.step import make_model_fn

SCHEDULE = make_schedule("linear", num_timesteps=100)


def toy_teacher(params, z, t, cond):
  """A smooth nonlinear v-prediction 'teacher' that depends on z, t and the label."""
  del params
  scale = (1.0 + t.astype(jnp.float32) / 50.0 + 0.1 * cond.astype(jnp.float32)).reshape(-1, 1, 1, 1)
  return jnp.tanh(scale * z) + 0.3 * jnp.sin(2.0 * z)


def test_grids_nest_and_match_the_trailing_sampler():
  T = SCHEDULE.num_timesteps
  for n in (1, 2, 4, 8, 16):
    grid = student_grid(num_timesteps=T, num_steps=n)
    np.testing.assert_array_equal(
      grid, np.asarray(make_timesteps(num_timesteps=T, num_steps=n, spacing="trailing"))[:n]
    )
    t, mid, nxt = step_triplets(num_timesteps=T, num_student_steps=n)
    np.testing.assert_array_equal(t, grid)
    assert t[-1] == T - 1 and nxt[0] == -1 and np.all(nxt < mid) and np.all(mid < t)
    assert set(mid) | set(t) == set(student_grid(num_timesteps=T, num_steps=2 * n))
  with pytest.raises(ValueError, match="2 \\* num_student_steps"):
    step_triplets(num_timesteps=T, num_student_steps=64)


def test_one_ddim_step_to_the_target_lands_on_the_teachers_two_steps():
  T, B = SCHEDULE.num_timesteps, 6
  key = jax.random.key(0)
  z = jax.random.normal(key, (B, 8, 8, 1))
  labels = jnp.arange(B) % 10
  for n in (1, 2, 5):
    ts, mids, nexts = (jnp.asarray(a) for a in step_triplets(num_timesteps=T, num_student_steps=n))
    i = jnp.arange(B) % n
    t, mid, nxt = ts[i], mids[i], nexts[i]
    z_next = teacher_two_steps(
      teacher_fn=toy_teacher,
      teacher_params=None,
      schedule=SCHEDULE,
      z_t=z,
      t=t,
      t_mid=mid,
      t_next=nxt,
      cond=labels,
    )
    x = one_step_target(schedule=SCHEDULE, z_t=z, t=t, t_next=nxt, z_next=z_next)
    eps = diffusion.eps_from_x0(schedule=SCHEDULE, x_t=z, t=t, x0=x)
    student_step = ddim_update(schedule=SCHEDULE, x0=x, eps=eps, t_next=nxt)
    np.testing.assert_allclose(student_step, z_next, atol=2e-4, rtol=1e-4)


def test_a_student_predicting_the_target_samples_like_the_teacher_in_half_the_steps():
  """A 'perfect' student (the closed-form target as its v) with N DDIM steps equals the 2N-step teacher."""
  T = SCHEDULE.num_timesteps
  x_T = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  labels = jnp.array([0, 3, 5, 9])
  for n in (1, 2, 4):
    ts, mids, nexts = (jnp.asarray(a) for a in step_triplets(num_timesteps=T, num_student_steps=n))

    def perfect_student(params, z, t, cond, ts=ts, mids=mids, nexts=nexts):
      i = jnp.argmax(ts[None, :] == t[:, None], axis=1)
      z2 = teacher_two_steps(
        teacher_fn=toy_teacher,
        teacher_params=None,
        schedule=SCHEDULE,
        z_t=z,
        t=t,
        t_mid=mids[i],
        t_next=nexts[i],
        cond=cond,
      )
      x = one_step_target(schedule=SCHEDULE, z_t=z, t=t, t_next=nexts[i], z_next=z2)
      eps = diffusion.eps_from_x0(schedule=SCHEDULE, x_t=z, t=t, x0=x)
      return diffusion.v_from_eps_x0(schedule=SCHEDULE, t=t, eps=eps, x0=x)

    common = {
      "schedule": SCHEDULE,
      "x_T": x_T,
      "key": jax.random.key(2),
      "cond": labels,
      "spacing": "trailing",
      "prediction": "v",
      "clip_x0": None,
    }
    student = ddim_sample(model_fn=perfect_student, params=None, num_steps=n, **common)
    teacher = ddim_sample(model_fn=toy_teacher, params=None, num_steps=2 * n, **common)
    np.testing.assert_allclose(student, teacher, atol=1e-3, rtol=1e-3)


def test_loss_is_zero_for_the_perfect_student_and_weights_are_truncated_snr():
  x0 = jax.random.uniform(jax.random.key(3), (8, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.arange(8)
  kw = {
    "teacher_fn": toy_teacher,
    "teacher_params": None,
    "schedule": SCHEDULE,
    "x0": x0,
    "cond": labels,
    "key": jax.random.key(4),
    "num_student_steps": 4,
  }
  loss, per = progressive_distillation_loss(
    student_fn=lambda p, z, t, c: jnp.zeros_like(z), student_params=None, **kw
  )
  assert per.shape == (8,) and float(loss) > 0
  # Predicting v = 0 means x_hat = alpha z: the per-example loss is max(SNR, 1) * mse(alpha z - x~).
  _, per_const = progressive_distillation_loss(
    student_fn=lambda p, z, t, c: jnp.zeros_like(z), student_params=None, weighting="constant", **kw
  )
  ratio = np.asarray(per / per_const)
  assert np.all(ratio >= 1.0 - 1e-6)


def test_student_loss_falls_on_a_tiny_unet():
  model = UNet(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, False),
    attention_head_dim=8,
    norm_num_groups=4,
    num_classes=10,
  )
  teacher_params = init_params(model, key=jax.random.key(0), shape=(8, 8, 1))
  tx = make_optimizer(learning_rate=2e-3, warmup_steps=1)
  state = create_train_state(params=jax.tree.map(jnp.copy, teacher_params), tx=tx)
  step = jax.jit(
    make_progressive_step(
      student_fn=lambda k: make_model_fn(model, train=True, dropout_key=k),
      teacher_fn=make_model_fn(model),
      schedule=SCHEDULE,
      tx=tx,
      num_student_steps=2,
      cond_fn=lambda batch, key: batch["label"],
    )
  )
  ds, key, losses = load_digits(), jax.random.key(5), []
  batch = jax.tree.map(jnp.asarray, get_batch(ds, step=0, seed=0, global_batch_size=32))
  for _ in range(40):  # one fixed batch: the regression problem itself must be fitted
    state, m = step(state, batch, key, teacher_params)
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and int(state.skipped) == 0
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
  # EMA is off by default (Salimans & Ho): ema_params track the raw parameters.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_update_is_skipped_and_counted():
  model = UNet(
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_levels=(False, False),
    attention_head_dim=8,
    norm_num_groups=4,
    num_classes=10,
  )
  params = init_params(model, key=jax.random.key(0), shape=(8, 8, 1))
  tx = make_optimizer(learning_rate=1e-3, warmup_steps=1)
  step = jax.jit(
    make_progressive_step(
      student_fn=lambda k: make_model_fn(model, train=True, dropout_key=k),
      teacher_fn=make_model_fn(model),
      schedule=SCHEDULE,
      tx=tx,
      num_student_steps=2,
      cond_fn=lambda batch, key: batch["label"],
    )
  )
  batch = jax.tree.map(jnp.asarray, get_batch(load_digits(), step=0, seed=0, global_batch_size=8))
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
  state, _ = step(create_train_state(params=params, tx=tx), bad, jax.random.key(0), params)
  assert int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
