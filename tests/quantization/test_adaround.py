"""AdaRound-style block reconstruction: learned rounding lowers the block error and stays on the grid."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffjax.quantization import CalibrationInputs, QuantConfig, QuantizedModel, calibrate, fake_quant_params
from diffjax.quantization.adaround import adaround, rectified_sigmoid


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="out")(nn.gelu(nn.Dense(16, name="hidden")(x)))


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x, t, label=None):
    return _Block(name="block")(x) + x


def test_rectified_sigmoid_range():
  v = jnp.array([-100.0, 0.0, 100.0])
  np.testing.assert_allclose(rectified_sigmoid(v), [0.0, 0.5, 1.0])


def test_adaround_lowers_block_error_and_keeps_weights_on_the_grid():
  model = _Model()
  rng = np.random.default_rng(0)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)), jnp.zeros((1,)))["params"]
  inputs = CalibrationInputs(
    x=rng.standard_normal((2, 64, 6)).astype(np.float32), t=np.array([5, 0]), cond=None
  )
  cfg = QuantConfig(dense_weight_bits=3, dense_act_bits=None, layer_bits=())
  qm = QuantizedModel(model, cfg)
  quant = calibrate(qm, params, inputs, method="time_aware", num=128)
  new, report = adaround(qm, params, quant, inputs, num=128, iters=300, batch_size=64, learning_rate=1e-2)
  assert set(report) == {"block"}
  assert report["block"]["adaround_mse"] < 0.9 * report["block"]["nearest_mse"]
  assert jax.tree.structure(new) == jax.tree.structure(params)
  # Learned kernels lie on the grid (the fake quantizer leaves them unchanged) but differ from nearest.
  fq_new = traverse_util.flatten_dict(fake_quant_params(new, quant, cfg))
  fq_old = traverse_util.flatten_dict(fake_quant_params(params, quant, cfg))
  flat_new = traverse_util.flatten_dict(new)
  for k in (("block", "hidden", "kernel"), ("block", "out", "kernel")):
    np.testing.assert_allclose(fq_new[k], flat_new[k], atol=1e-6)
    assert np.any(np.asarray(fq_new[k]) != np.asarray(fq_old[k]))
  # The whole quantized model is closer to full precision on the calibration data.
  x, t = jnp.asarray(inputs.x.reshape(-1, 6)), jnp.zeros((128,))
  ref = model.apply({"params": params}, x, t)
  err = lambda p: float(jnp.mean((qm.apply({"params": p, "quant": quant}, x, t) - ref) ** 2))
  assert err(new) < err(params)
  with pytest.raises(ValueError, match="iters"):
    adaround(qm, params, quant, inputs, iters=0)


def test_adaround_naive_data_is_that_of_the_chosen_steps():
  """``method="single"`` reconstructs on the last step's inputs only: the same as a recording of that step."""
  model = _Model()
  rng = np.random.default_rng(1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)), jnp.zeros((1,)))["params"]
  x = rng.standard_normal((2, 32, 6)).astype(np.float32)
  x[1] *= 0.2  # the last step's inputs have another range than the first's
  inputs = CalibrationInputs(x=x, t=np.array([5, 0]), cond=None)
  last_only = CalibrationInputs(x=x[1:], t=np.array([0]), cond=None)
  cfg = QuantConfig(dense_weight_bits=3, dense_act_bits=None, layer_bits=())
  qm = QuantizedModel(model, cfg)
  quant = calibrate(qm, params, inputs, method="time_aware", num=64)
  kw = {"num": 32, "iters": 30, "batch_size": 32, "learning_rate": 1e-2}
  single, rep_single = adaround(qm, params, quant, inputs, method="single", **kw)
  ref, rep_ref = adaround(qm, params, quant, last_only, method="time_aware", **kw)
  _, rep_ta = adaround(qm, params, quant, inputs, method="time_aware", **kw)
  assert rep_single["block"]["nearest_mse"] == rep_ref["block"]["nearest_mse"]
  jax.tree.map(np.testing.assert_array_equal, single, ref)
  # Time-aware data also holds the first step's larger inputs: another reconstruction problem.
  assert rep_ta["block"]["nearest_mse"] > 2 * rep_single["block"]["nearest_mse"]
  with pytest.raises(ValueError, match="method"):
    adaround(qm, params, quant, inputs, method="per_timestep")
