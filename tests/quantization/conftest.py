"""A tiny class-conditional U-Net (mid-block attention, up-path concatenations) and its recorded DDIM inputs."""

import jax
import jax.numpy as jnp
import pytest

from diffjax.models import UNet
from diffjax.quantization import record_ddim_inputs
from diffjax.schedules import make_schedule
from diffjax.training.step import make_model_fn

NUM_STEPS = 4


@pytest.fixture(scope="session")
def tiny():
  """(model, params, schedule, inputs): 8 trajectories of DDIM-4 with guidance 2 (16 model rows)."""
  model = UNet(
    block_out_channels=[8],  # lists, as in a model built from a JSON config (unhashable module)
    layers_per_block=1,
    attention_levels=[False],
    attention_head_dim=8,
    norm_num_groups=4,
    num_classes=10,
  )
  x = jnp.zeros((2, 8, 8, 1))
  params = model.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))["params"]
  schedule = make_schedule("linear", num_timesteps=40)
  labels = jnp.arange(8) % 10
  inputs, samples = record_ddim_inputs(
    model_fn=make_model_fn(model),
    params=params,
    schedule=schedule,
    x_T=jax.random.normal(jax.random.key(1), (8, 8, 8, 1)),
    key=jax.random.key(2),
    cond=labels,
    num_steps=NUM_STEPS,
    guidance_scale=2.0,
    null_cond=jnp.full_like(labels, 10),
  )
  return model, params, schedule, inputs, samples


@pytest.fixture(scope="session")
def calibrated8(tiny):
  """(QuantizedModel, quant) for W8A8 with split shortcuts and a per-timestep table."""
  from diffjax.quantization import QuantConfig, QuantizedModel, calibrate

  model, params, _, inputs, _ = tiny
  qm = QuantizedModel(model, QuantConfig.wa(8, 8, split_shortcut=True))
  return qm, calibrate(qm, params, inputs, method="per_timestep")


@pytest.fixture(scope="session")
def apply8(calibrated8):
  """The jitted quantized forward pass of ``calibrated8``'s model, compiled once for all tests."""
  return jax.jit(calibrated8[0].apply)


@pytest.fixture(scope="session")
def apply_fp(tiny):
  """The jitted full-precision forward pass of the tiny model."""
  return jax.jit(tiny[0].apply)
