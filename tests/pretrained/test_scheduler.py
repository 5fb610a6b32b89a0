"""Scheduler configs: schedules and timesteps bit-identical to diffusers, DDIM step for step vs DDIMScheduler.

The comparisons with diffusers run a closed-form stand-in model (no network), and are skipped without torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.pretrained.scheduler import scheduler_from_config
from diffjax.samplers.ddim import ddim_sample, ddim_step

SD = {  # Stable Diffusion 1.x/2.x's scheduler_config.json (PNDMScheduler keys)
  "_class_name": "PNDMScheduler",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000,
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "trained_betas": None,
  "clip_sample": False,
}
CASES = {
  "sd": SD,
  "sd_v_trailing": {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
  "linspace_sample_clip": {
    "beta_schedule": "linear",
    "timestep_spacing": "linspace",
    "prediction_type": "sample",
    "clip_sample": True,
    "clip_sample_range": 0.8,
    "num_train_timesteps": 500,
  },
  "cosine_alpha_one": {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True, "clip_sample": False},
}


def _toy(x, t, xp):
  """A smooth stand-in for a denoiser, written once for NumPy/torch and JAX (``xp`` = the array module)."""
  s = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  return 0.7 * x * xp.cos(3.0 * s) + 0.2 * xp.sin(x + s)


@pytest.fixture(scope="module")
def torch_ddim():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  return torch, diffusers.DDIMScheduler


@pytest.mark.parametrize("name", sorted(CASES))
def test_tables_are_bit_identical(name, torch_ddim):
  _, DDIMScheduler = torch_ddim
  ref = DDIMScheduler.from_config(CASES[name])
  ours = scheduler_from_config(CASES[name])
  np.testing.assert_array_equal(ours.schedule.alphas_cumprod, ref.alphas_cumprod.numpy())
  assert ours.final_alpha_bar == float(ref.final_alpha_cumprod)
  for n in (1, 3, 7, 25, 50, 333):
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours.timesteps(n), ref.timesteps.numpy(), err_msg=f"{n} steps")


@pytest.mark.parametrize("name", sorted(CASES))
def test_ddim_step_for_step(name, torch_ddim):
  torch, DDIMScheduler = torch_ddim
  ref = DDIMScheduler.from_config(CASES[name])
  ours = scheduler_from_config(CASES[name])
  n = 7
  ref.set_timesteps(n)
  table = ours.table(n)
  x0 = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  xr, xo = torch.from_numpy(x0), jnp.asarray(x0)
  model_fn = lambda p, x, t, c: _toy(x, t.astype(jnp.float32), jnp)
  step = jax.jit(
    lambda x, t, t_prev: ddim_step(
      model_fn=model_fn,
      params=None,
      schedule=ours.schedule,
      x_t=x,
      t=t,
      t_prev=t_prev,
      cond=None,
      key=jax.random.key(0),
      prediction=ours.prediction,
      clip_x0=ours.clip_x0,
      final_alpha_bar=table.final_alpha_bar,
      eps_from_clipped_x0=False,
    )
  )
  for i, t in enumerate(ref.timesteps):
    j = n - 1 - i
    assert int(table.timesteps[j]) == int(t)
    xr = ref.step(_toy(xr, t.float().reshape(1), torch), t, xr).prev_sample
    xo = step(xo, table.timesteps[j], table.prev_timesteps[j])
    np.testing.assert_allclose(
      np.asarray(xo), xr.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"step {i} (t={int(t)})"
    )
  if name != "sd":
    return
  # The jitted loop with a traced step count gives the same result, and a new count does not recompile.
  traces = []

  @jax.jit
  def run(x, table, num_steps):
    traces.append(1)
    return ddim_sample(
      model_fn=model_fn,
      params=None,
      schedule=ours.schedule,
      x_T=x,
      key=jax.random.key(0),
      num_steps=num_steps,
      prediction=ours.prediction,
      clip_x0=ours.clip_x0,
      table=table,
      eps_from_clipped_x0=False,
    )

  np.testing.assert_allclose(np.asarray(run(x0, table, n)), xr.numpy(), rtol=1e-5, atol=1e-5)
  run(x0, ours.table(3), 3)
  assert len(traces) == 1


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid'"),
    ("timestep_spacing", "karras", "timestep_spacing"),
    ("prediction_type", "flow", "prediction_type"),
    ("thresholding", True, "thresholding"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr"),
    ("num_train_timesteps", 1.5, "num_train_timesteps"),
  ],
)
def test_unsupported_values_are_named(key, value, match):
  with pytest.raises(ValueError, match=match):
    scheduler_from_config({**SD, key: value})


def test_bad_step_counts():
  sched = scheduler_from_config(SD)
  with pytest.raises(ValueError, match="num_steps"):
    sched.table(0)
  with pytest.raises(ValueError, match="num_steps"):
    sched.table(1001)
  with pytest.raises(ValueError, match="outside"):
    scheduler_from_config({**SD, "steps_offset": 5}).timesteps(1000)


def test_trained_betas_and_defaults():
  betas = np.linspace(1e-4, 0.02, 10)
  sched = scheduler_from_config({"num_train_timesteps": 10, "trained_betas": betas.tolist()})
  np.testing.assert_allclose(sched.schedule.betas, betas, rtol=1e-6)
  # DDIMScheduler defaults: clip_sample on, set_alpha_to_one on, leading spacing, no offset.
  assert sched.clip_x0 == 1.0 and sched.final_alpha_bar == 1.0 and sched.prediction == "eps"
  np.testing.assert_array_equal(sched.timesteps(3), [6, 3, 0])
  with pytest.raises(ValueError, match="trained_betas"):
    scheduler_from_config({"num_train_timesteps": 11, "trained_betas": betas.tolist()})
