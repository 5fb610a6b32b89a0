"""Recording full-precision DDIM inputs and choosing calibration examples per method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.guidance import classifier_free_guidance
from diffjax.quantization import CALIBRATION_METHODS, QuantConfig, QuantizedModel, calibrate, select_inputs
from diffjax.samplers import ddim_sample
from diffjax.training.step import make_model_fn

from .conftest import NUM_STEPS


def test_recorded_trajectory_is_the_samplers(tiny):
  model, params, schedule, inputs, samples = tiny
  labels = jnp.arange(8) % 10
  guided = classifier_free_guidance(
    make_model_fn(model), guidance_scale=2.0, null_cond=jnp.full_like(labels, 10)
  )
  ref = ddim_sample(
    model_fn=guided,
    params=params,
    schedule=schedule,
    x_T=jax.random.normal(jax.random.key(1), (8, 8, 8, 1)),
    key=jax.random.key(2),
    cond=labels,
    num_steps=NUM_STEPS,
  )
  np.testing.assert_allclose(samples, ref, atol=1e-5)
  assert inputs.x.shape == (NUM_STEPS, 16, 8, 8, 1)
  np.testing.assert_array_equal(inputs.t, [30, 20, 10, 0])  # noisiest first
  np.testing.assert_array_equal(inputs.cond, np.concatenate([labels, np.full(8, 10)]))
  np.testing.assert_allclose(inputs.x[0, :8], inputs.x[0, 8:])  # conditional and null rows see the same x


def test_select_inputs_per_method(tiny):
  inputs = tiny[3]
  S, N = inputs.num_steps, inputs.num_rows
  ((x, t, c),) = select_inputs(inputs, method="single")
  assert x.shape[0] == N and set(t.tolist()) == {0}
  ((x, t, c),) = select_inputs(inputs, method="single", step=0)
  assert set(t.tolist()) == {30}
  ((x, t, c),) = select_inputs(inputs, method="time_aware", num=8)
  assert x.shape[0] == 8 and sorted(t.tolist()) == [0, 0, 10, 10, 20, 20, 30, 30]
  ((x, t, c),) = select_inputs(inputs, method="random", num=64, seed=3)
  assert x.shape[0] == 64 and set(t.tolist()) <= set(inputs.t.tolist()) and len(set(t.tolist())) > 1
  groups = select_inputs(inputs, method="per_timestep")
  assert len(groups) == S and [int(g[1][0]) for g in groups] == inputs.t.tolist()
  for x, t, c in (select_inputs(inputs, method="time_aware", num=8)[0],):
    # Each example is a recorded (row, step) pair with its own condition.
    row = [i for i in range(N) if any(np.array_equal(x[0], inputs.x[s, i]) for s in range(S))]
    assert row and any(c[0] == inputs.cond[i] for i in row)
  with pytest.raises(ValueError, match="method"):
    select_inputs(inputs, method="mse")
  with pytest.raises(ValueError, match="step"):
    select_inputs(inputs, method="single", step=S)
  assert set(CALIBRATION_METHODS) == {"single", "random", "time_aware", "per_timestep"}


def test_time_aware_ranges_cover_the_trajectory_and_single_step_ranges_do_not(tiny):
  model, params, _, inputs, _ = tiny
  qm = QuantizedModel(model, QuantConfig.wa(8, 8, act_search=False, split_shortcut=True))
  q_single = calibrate(qm, params, inputs, method="single")
  q_time = calibrate(qm, params, inputs, method="time_aware", num=inputs.num_rows)
  q_table = calibrate(qm, params, inputs, method="per_timestep")
  # The stem sees x_t: at t = 0 (last step) a clean-ish image, at t = 30 mostly noise of unit variance.
  rng = lambda q: float(q["conv_in"]["act_scale"][0]) * 255
  assert rng(q_time) > rng(q_single)
  table = np.asarray(q_table["conv_in"]["act_scale"]) * 255
  x = inputs.x.reshape(inputs.num_steps, -1)
  np.testing.assert_allclose(table, np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0), rtol=1e-5)
