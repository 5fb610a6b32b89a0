"""Uniform quantizers in closed form, straight-through gradients, range search and int4 packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.quantization.quantizers import (
  activation_range,
  check_bits,
  fake_quant,
  fake_quant_weight,
  int_range,
  pack_int4,
  quantize_to_int,
  round_ste,
  unpack_int4,
  weight_scales,
)


def test_int_ranges():
  assert int_range(8, symmetric=True) == (-127, 127)
  assert int_range(4, symmetric=True) == (-7, 7)
  assert int_range(8, symmetric=False) == (0, 255)
  assert int_range(4, symmetric=False) == (0, 15)
  for bad in (1, 17, 4.0, True, "8"):
    with pytest.raises(ValueError, match="bits"):
      check_bits(bad)


def test_fake_quant_closed_form_symmetric_and_asymmetric():
  x = jnp.array([-1.0, -0.26, 0.0, 0.24, 0.5, 2.0])
  got = fake_quant(x, scale=0.25, zero_point=0.0, q_min=-7, q_max=7)
  np.testing.assert_allclose(got, [-1.0, -0.25, 0.0, 0.25, 0.5, 1.75])
  # Asymmetric 4-bit, s = 0.1, z = 3: representable values are (q - 3) * 0.1 for q in [0, 15].
  x = jnp.array([-0.5, -0.3, 0.04, 0.06, 1.2, 5.0])
  got = fake_quant(x, scale=0.1, zero_point=3.0, q_min=0, q_max=15)
  np.testing.assert_allclose(got, [-0.3, -0.3, 0.0, 0.1, 1.2, 1.2], atol=1e-7)
  ints = quantize_to_int(x, scale=0.1, zero_point=3.0, q_min=0, q_max=15)
  np.testing.assert_array_equal(ints, [0, 0, 3, 4, 15, 15])


def test_straight_through_gradients():
  x = jnp.array([-3.0, -0.8, -0.1, 0.3, 0.74, 2.0])
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(round_ste(v)))(x), np.ones(6))
  np.testing.assert_array_equal(round_ste(x), jnp.round(x))
  # 2-bit symmetric, s = 0.5: x / s = [-6, -1.6, -0.2, 0.6, 1.48, 4] rounds to [-6, -2, 0, 1, 1, 4];
  # the gradient is 1 where that lies in [-1, 1] (bounds included) and 0 where it is clipped.
  g = jax.grad(lambda v: jnp.sum(fake_quant(v, scale=0.5, zero_point=0.0, q_min=-1, q_max=1)))(x)
  np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
  # The gradient reaches the scale too (learned-step-size style): d/ds of (round(x/s)) * s = round(x/s) - x/s.
  gs = jax.grad(lambda s: fake_quant(jnp.float32(0.3), scale=s, zero_point=0.0, q_min=-7, q_max=7))(0.25)
  np.testing.assert_allclose(gs, 1.0 - 0.3 / 0.25, rtol=1e-6)


def test_weight_scales_per_output_channel():
  w = jnp.stack([jnp.linspace(-1.0, 1.0, 27), jnp.linspace(-0.1, 0.2, 27)], axis=-1).reshape(3, 3, 3, 2)
  s = weight_scales(w, 8, search=False)
  np.testing.assert_allclose(s, [1.0 / 127, 0.2 / 127], rtol=1e-6)
  # The searched scale never has a larger error than min-max and never a larger range.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_t(3, size=(64, 5)), jnp.float32)
  for bits in (4, 8):
    s_mm, s_se = weight_scales(w, bits, search=False), weight_scales(w, bits, search=True)
    assert np.all(np.asarray(s_se) <= np.asarray(s_mm) + 1e-9)
    err = lambda s, b=bits: np.mean(np.abs(np.asarray(fake_quant_weight(w, s, b) - w)) ** 2.4, axis=0)
    assert np.all(err(s_se) <= err(s_mm) + 1e-9)
  q = fake_quant_weight(w, s_mm, 4)
  levels = np.asarray(q) / np.asarray(s_mm)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert np.abs(levels).max() <= 7


def test_activation_range_closed_form():
  v = jnp.array([-1.0, 0.0, 3.0])
  s, z = activation_range(v, lo=-1.0, hi=3.0, bits=8, search=False)
  np.testing.assert_allclose(s, 4.0 / 255, rtol=1e-6)
  assert float(z) == 64.0  # round(1 / (4 / 255)) = round(63.75)
  s, z = activation_range(v, lo=-1.0, hi=3.0, bits=8, mode="symmetric", search=False)
  np.testing.assert_allclose(s, 3.0 / 127, rtol=1e-6)
  assert float(z) == 0.0
  s, z = activation_range(jnp.array([0.1, 0.9]), lo=0.1, hi=0.9, bits=8, mode="unsigned", search=False)
  np.testing.assert_allclose(s, 0.9 / 255, rtol=1e-6)
  assert float(z) == 0.0
  # A positive-only range still contains zero.
  s, z = activation_range(jnp.array([2.0, 4.0]), lo=2.0, hi=4.0, bits=4, search=False)
  np.testing.assert_allclose(s, 4.0 / 15, rtol=1e-6)
  assert float(z) == 0.0
  with pytest.raises(ValueError, match="mode"):
    activation_range(v, lo=-1.0, hi=3.0, bits=8, mode="per-channel")


def test_activation_range_search_beats_min_max_and_uses_sample_weights():
  rng = np.random.default_rng(1)
  v = rng.laplace(size=4000).astype(np.float32)
  err = lambda s, z: float(
    np.mean(np.abs(np.asarray(fake_quant(v, scale=s, zero_point=z, q_min=0, q_max=15)) - v) ** 2.4)
  )
  mm = activation_range(v, lo=v.min(), hi=v.max(), bits=4, search=False)
  se = activation_range(v, lo=v.min(), hi=v.max(), bits=4, search=True)
  assert err(*se) < 0.8 * err(*mm)
  # Zero-weight entries (padding) do not count.
  padded = np.concatenate([v, np.full(100, 50.0, np.float32)])
  w = np.concatenate([np.ones(4000), np.zeros(100)]).astype(np.float32)
  np.testing.assert_allclose(activation_range(padded, weights=w, lo=v.min(), hi=v.max(), bits=4), se)
  # Heavily weighted outliers forbid clipping them: at 16 bits the full range is kept.
  v2 = np.concatenate([rng.standard_normal(1000), [40.0]]).astype(np.float32)
  w2 = np.concatenate([np.full(1000, 1e5), [1.0]]).astype(np.float32)
  s16, _ = activation_range(v2, weights=w2, lo=v2.min(), hi=v2.max(), bits=16)
  np.testing.assert_allclose(s16 * 65535, v2.max() - min(v2.min(), 0), rtol=1e-5)
  # Leading axes are independent problems.
  s, z = activation_range(
    np.stack([v, 2 * v]), lo=np.array([v.min(), 2 * v.min()]), hi=np.array([v.max(), 2 * v.max()]), bits=4
  )
  np.testing.assert_allclose(s, [se[0], 2 * se[0]], rtol=1e-5)
  np.testing.assert_allclose(z, [se[1], se[1]])


def test_int4_packing_round_trip():
  q = np.array([-8, -7, -1, 0, 1, 7, 3], np.int32)
  packed = pack_int4(q)
  assert packed.dtype == np.uint8 and packed.shape == (4,)
  assert packed[0] == ((-8) & 0xF) | (((-7) & 0xF) << 4)
  np.testing.assert_array_equal(unpack_int4(packed, q.size), q)
  with pytest.raises(ValueError, match="int4"):
    pack_int4(np.array([8]))
  with pytest.raises(ValueError, match="bytes"):
    unpack_int4(packed, 10)
