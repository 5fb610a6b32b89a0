"""SDEdit on the exact Gaussian denoiser: masks keep the guide exactly, strength trades faithfulness for realism."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.editing import sdedit, sdedit_num_steps
from diffjax.editing.sdedit import sdedit_full_steps
from diffjax.samplers import ddim_sample
from diffjax.samplers.timesteps import make_timesteps
from diffjax.schedules import make_schedule
from tests.samplers.gaussian_model import exact_model_fn

MU, S = 0.3, 0.5
SCHEDULE = make_schedule("linear", num_timesteps=200)
MODEL = exact_model_fn(SCHEDULE, mu=MU, s=S)


def _guide(value=2.0, shape=(64, 4, 4, 1)):
  return jnp.full(shape, value, jnp.float32)


def _run(x_guide, strength, **kw):
  kw = {"num_steps": 20, **kw}
  return sdedit(
    model_fn=MODEL,
    params=None,
    schedule=SCHEDULE,
    x_guide=x_guide,
    key=jax.random.key(0),
    strength=strength,
    clip_x0=None,
    **kw,
  )


def test_strength_one_is_ddim_from_the_noised_guide():
  x_g = _guide()
  out = _run(x_g, 1.0)
  ts = make_timesteps(num_timesteps=200, num_steps=20, spacing="trailing")
  assert int(ts[19]) == 199
  x_t0 = jnp.sqrt(SCHEDULE.alphas_cumprod[199]) * x_g + jnp.sqrt(1 - SCHEDULE.alphas_cumprod[199]) * (
    jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), x_g.shape)
  )
  ref = ddim_sample(
    model_fn=MODEL,
    params=None,
    schedule=SCHEDULE,
    x_T=x_t0,
    key=jax.random.fold_in(jax.random.key(0), 1),
    num_steps=20,
    spacing="trailing",
    clip_x0=None,
  )
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_strength_trades_faithfulness_for_realism(sampler):
  """An out-of-distribution guide (value 2 for data N(0.3, 0.5^2)): the paper's Fig. 3 curve."""
  x_g = _guide(2.0)
  faithful, unreal = [], []
  for strength in (0.05, 0.15, 0.3, 1.0):
    out = np.asarray(_run(x_g, strength, sampler=sampler))
    faithful.append(float(np.sqrt(np.mean((out - 2.0) ** 2))))
    unreal.append(abs(out.mean() - MU) + abs(out.std() - S))
  assert all(a < b for a, b in itertools.pairwise(faithful)), faithful
  assert all(a > b for a, b in itertools.pairwise(unreal)), unreal
  assert faithful[0] < 0.6 and unreal[-1] < 0.1, (faithful, unreal)


def test_mask_keeps_the_unmasked_region_exactly():
  x_g = jax.random.uniform(jax.random.key(3), (8, 6, 6, 2), minval=-1, maxval=1)
  mask = np.zeros((8, 6, 6, 1), np.float32)
  mask[:, 2:5, 1:4] = 1.0
  for sampler in ("ddim", "ddpm"):
    out = np.asarray(_run(x_g, 0.7, mask=jnp.asarray(mask), sampler=sampler, eta=1.0))
    keep = np.broadcast_to(mask == 0, out.shape)
    np.testing.assert_array_equal(out[keep], np.asarray(x_g)[keep])
    assert np.abs(out[~keep] - np.asarray(x_g)[~keep]).mean() > 0.05
  nothing = _run(x_g, 1.0, mask=jnp.zeros((8, 6, 6, 1)))
  np.testing.assert_array_equal(nothing, x_g)


def test_strength_is_traced_without_recompiling():
  @jax.jit
  def edit(x_g, strength):
    return _run(x_g, strength)

  x_g = _guide()
  outs = [edit(x_g, s) for s in (0.2, 0.5, 0.9)]
  assert edit._cache_size() == 1
  np.testing.assert_allclose(outs[1], _run(x_g, 0.5), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(outs[0] - outs[2]).mean()) > 0.1


def test_steps_run():
  ks = [int(sdedit_num_steps(strength=s, num_steps=50)) for s in (0.01, 0.2, 0.5, 0.61, 1.0)]
  assert ks == [1, 10, 25, 31, 50]
  assert int(sdedit_num_steps(strength=0.5, num_steps=1000)) == 500


def test_full_steps_are_all_timesteps_for_ddpm_and_num_steps_for_ddim():
  assert sdedit_full_steps(sampler="ddpm", num_steps=50, num_timesteps=1000) == 1000
  assert sdedit_full_steps(sampler="ddim", num_steps=50, num_timesteps=1000) == 50


@pytest.mark.parametrize(
  "kwargs, needle",
  [
    ({"strength": 0.0}, "strength must be in (0, 1], got 0.0"),
    ({"strength": 1.5}, "strength must be in (0, 1], got 1.5"),
    ({"strength": np.ones(2) * 0.5}, "strength must be a scalar, got shape (2,)"),
    ({"strength": 0.5, "sampler": "dpm"}, "sampler='dpm' is not one of ('ddim', 'ddpm')"),
    (
      {"strength": 0.5, "mask": jnp.ones((64, 4, 5, 1))},
      "mask must have shape [B, H, W, 1] or [64, 4, 4, 1]",
    ),
    ({"strength": 0.5, "num_steps": 0}, "num_steps must be in [1, 200]"),
  ],
)
def test_bad_inputs(kwargs, needle):
  with pytest.raises(ValueError) as err:
    _run(_guide(), **kwargs)
  assert needle in str(err.value)
