"""Fake quantization by method interception: 16-bit equality, per-timestep tables, splitting, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffjax.quantization import QuantConfig, QuantizedModel, calibrate, fake_quant, select_inputs
from diffjax.quantization.quantizers import int_range


def _step_batch(inputs, s):
  return jnp.asarray(inputs.x[s]), jnp.full((inputs.num_rows,), inputs.t[s]), jnp.asarray(inputs.cond)


def test_16_bit_fake_quant_equals_full_precision(tiny, apply_fp):
  model, params, _, inputs, _ = tiny
  # Every weight and activation at 16 bits, the stem and head included (same observed sites as the
  # 8-bit fixture, so calibration reuses its compiled observation pass).
  sixteen = (("conv_in", 16, 16), ("conv_out", 16, 16))
  cfg = QuantConfig.wa(16, 16, softmax_bits=16, split_shortcut=True, layer_bits=sixteen)
  qm = QuantizedModel(model, cfg)
  apply = jax.jit(qm.apply)
  # A per-timestep table, on every recorded step.
  quant = calibrate(qm, params, inputs, method="per_timestep")
  for s in range(inputs.num_steps):
    x, t, y = _step_batch(inputs, s)
    out = apply({"params": params, "quant": quant}, x, t, y)
    assert float(jnp.max(jnp.abs(out - apply_fp({"params": params}, x, t, y)))) < 1e-3
  # One static scale, on its calibration examples (spread over the trajectory).
  quant = calibrate(qm, params, inputs, method="time_aware")
  ((x, t, y),) = select_inputs(inputs, method="time_aware")
  x, t, y = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
  out = apply({"params": params, "quant": quant}, x, t, y)
  assert float(jnp.max(jnp.abs(out - apply_fp({"params": params}, x, t, y)))) < 1e-3


def test_unquantized_interception_is_the_model_and_8_bits_is_close_but_not_equal(
  tiny, calibrated8, apply8, apply_fp
):
  model, params, _, inputs, _ = tiny
  x, t, y = _step_batch(inputs, 1)
  ref = apply_fp({"params": params}, x, t, y)
  none = QuantizedModel(model, QuantConfig.wa(None, None, layer_bits=()))
  np.testing.assert_allclose(
    none.apply({"params": params, "quant": {"timesteps": jnp.zeros(1)}}, x, t, y), ref, atol=2e-5
  )
  qm, quant = calibrated8
  err = float(jnp.max(jnp.abs(apply8({"params": params, "quant": quant}, x, t, y) - ref)))
  assert 1e-4 < err < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_quant_collection_layout_and_split_shortcuts(tiny, calibrated8):
  _, params, _, inputs, _ = tiny
  _, quant = calibrated8
  flat = traverse_util.flatten_dict(quant)
  np.testing.assert_array_equal(quant["timesteps"], inputs.t)
  # Every conv / dense layer of the parameter tree has weight scales, one row per output channel.
  kernels = [k[:-1] for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"]
  for layer in kernels:
    assert (
      flat[layer + ("w_scale",)].shape[-1]
      == traverse_util.flatten_dict(params)[layer + ("kernel",)].shape[-1]
    )
  # One level of 8 channels: the up block's ResNets read concat([h, skip]) with h from the mid block (8),
  # then from its own first ResNet (8). Only the 1x1 shortcuts, which read the raw concatenation, split
  # (conv1 reads it after GroupNorm).
  expected = {("up_blocks_0", "resnets_0"): 8, ("up_blocks_0", "resnets_1"): 8}
  splits = {k[:2]: int(v) for k, v in flat.items() if k[-1] == "w_split"}
  assert splits == expected
  for block in expected:
    sc = block + ("conv_shortcut",)
    assert flat[sc + ("w_scale",)].shape[0] == 2
    assert flat[sc + ("act0_scale",)].shape == flat[sc + ("act1_scale",)].shape == (inputs.num_steps,)
    assert (sc + ("act_scale",)) not in flat
    assert (block + ("conv1", "act_scale")) in flat  # after GroupNorm: one quantizer
  for site in ("q", "k", "v", "p"):
    assert flat[("mid_block", "attentions_0", f"{site}_scale")].shape == (inputs.num_steps,)
  assert float(flat[("mid_block", "attentions_0", "p_zero")][0]) == 0.0  # softmax output: unsigned
  # Stem and head stay at 8 bits by default (layer_bits): conv_in has weights and input scales.
  assert ("conv_in", "w_scale") in flat and ("conv_in", "act_scale") in flat


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, t, label=None):
    return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones, name="d")(x)


def test_per_timestep_table_is_indexed_by_each_examples_nearest_timestep_inside_a_scan():
  model = _Linear()
  params = model.init(jax.random.key(0), jnp.zeros((1, 1)), jnp.zeros((1,)))["params"]
  cfg = QuantConfig(dense_weight_bits=None, dense_act_bits=4, layer_bits=())
  scales = jnp.array([0.1, 0.2, 0.5])
  quant = {"timesteps": jnp.array([0, 50, 99]), "d": {"act_scale": scales, "act_zero": jnp.zeros(3)}}
  qm = QuantizedModel(model, cfg)
  x = jnp.full((5, 1), 0.77)
  t = jnp.array([0, 20, 30, 80, 99])  # nearest rows 0, 0, 1, 2, 2
  out = qm.apply({"params": params, "quant": quant}, x, t)
  rows = scales[jnp.array([0, 0, 1, 2, 2])][:, None]
  q_min, q_max = int_range(4, symmetric=False)
  expected = fake_quant(x, scale=rows, zero_point=0.0, q_min=q_min, q_max=q_max)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  np.testing.assert_allclose(out[:, 0], [0.8, 0.8, 0.8, 1.0, 1.0], rtol=1e-6)

  # Inside a jitted scan over traced timesteps, as in a sampler.
  @jax.jit
  def loop(variables, ts):
    return jax.lax.scan(lambda c, ti: (c, qm.apply(variables, x[:1], jnp.full((1,), ti))[0, 0]), 0, ts)[1]

  np.testing.assert_allclose(loop({"params": params, "quant": quant}, t), out[:, 0], rtol=1e-6)


def test_gradients_flow_straight_through_to_parameters(tiny, calibrated8):
  _, params, _, inputs, _ = tiny
  qm, quant = calibrated8
  x, t, y = _step_batch(inputs, 2)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(qm.apply({"params": p, "quant": quant}, x, t, y) ** 2)))(params)
  flat = traverse_util.flatten_dict(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in flat.values())
  assert float(jnp.max(jnp.abs(flat[("up_blocks_0", "resnets_0", "conv_shortcut", "kernel")]))) > 0
  assert float(jnp.max(jnp.abs(flat[("mid_block", "attentions_0", "to_q", "kernel")]))) > 0


def test_bad_inputs(tiny):
  model, params, _, inputs, _ = tiny
  with pytest.raises(ValueError, match="conv_act_bits"):
    QuantConfig(conv_act_bits=1)
  with pytest.raises(ValueError, match="layer_bits"):
    QuantConfig(layer_bits=(("conv_in", 8),))
  with pytest.raises(ValueError, match="config"):
    QuantizedModel(model, {"bits": 8})
  qm = QuantizedModel(model, QuantConfig())
  x, t, y = _step_batch(inputs, 0)
  with pytest.raises(ValueError, match="quant"):
    qm.apply({"params": params}, x, t, y)
  with pytest.raises(ValueError, match="calibrate"):
    qm.apply({"params": params, "quant": {}}, x, t, y)
