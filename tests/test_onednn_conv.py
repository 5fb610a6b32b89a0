"""oneDNN convolutions (diffjax.onednn_conv): equal to XLA's forward and gradients; fall back where not covered."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import cpu_kernels
from diffjax.models.conv import conv
from diffjax.onednn_conv import (
  WINOGRAD_ENV,
  conv_general_dilated,
  winograd_conv,
  winograd_tile,
  winograd_weights,
)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, precision="highest")


def _value_and_grads(fn, x, w, dy):
  y, pull = jax.vjp(fn, x, w)
  return (y, *pull(dy))


@pytest.mark.parametrize(
  "batch, hw, cin, cout, k, strides, padding",
  [
    (4, (9, 9), 8, 16, 3, (1, 1), ((1, 1), (1, 1))),  # the U-Net's 3x3
    (3, (8, 8), 16, 8, 3, (2, 2), ((1, 1), (1, 1))),  # strided downsampler
    (2, (8, 8), 16, 8, 3, (2, 2), "VALID"),  # the autoencoder's downsampler (padded outside)
    (5, (7, 6), 12, 24, 1, (1, 1), "VALID"),  # 1x1 shortcut, odd batch split over threads
    (1, (6, 10), 3, 5, 3, (1, 2), ((2, 0), (1, 3))),  # asymmetric strides and padding
    (2, (7, 7), 1, 4, 3, (1, 1), "SAME"),
    (2, (7, 7), 16, 32, 3, (1, 1), "SAME"),  # Winograd forward and input gradient
  ],
)
def test_forward_and_gradients_match_xla(batch, hw, cin, cout, k, strides, padding):
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (batch, *hw, cin))
  w = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
  ours = lambda a, b: conv_general_dilated(a, b, strides, padding, dimension_numbers=DN)
  y = jax.jit(ours)(x, w)
  dy = jax.random.normal(jax.random.key(1), y.shape)
  got = jax.jit(lambda *a: _value_and_grads(ours, *a))(x, w, dy)
  want = jax.jit(lambda *a: _value_and_grads(lambda a, b: _reference(a, b, strides, padding), *a))(x, w, dy)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape, name
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-5, rtol=0, err_msg=name)
  hlo = (
    jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(ours(a, b) * dy), argnums=(0, 1)))
    .lower(x, w)
    .compile()
    .as_text()
  )
  pads = jax.lax.padtype_to_pads(hw, (k, k), strides, padding) if isinstance(padding, str) else padding
  y_shape = (batch, *y.shape[1:3], cout)
  winograd = (
    winograd_tile(x.shape, w.shape, strides, pads),
    winograd_tile(y_shape, (k, k, cout, cin), strides, pads),
  )
  pointwise = k == 1 and tuple(strides) == (1, 1) and tuple(map(tuple, pads)) == ((0, 0), (0, 0))
  fwd = "DiffjaxWinogradConv3x3" if winograd[0] else "DiffjaxOnednnConvFwd"
  assert fwd in hlo or (pointwise and "DiffjaxDense" in hlo)  # the native path was taken, not XLA's
  assert ("DiffjaxOnednnConvBwdData" in hlo) != bool(winograd[1])
  assert "DiffjaxOnednnConvBwdWeights" in hlo


@pytest.mark.parametrize(
  "case",
  [
    {"lhs": jnp.bfloat16},
    {"rhs_dilation": (2, 2)},
    {"feature_group_count": 2},
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
  ],
)
def test_uncovered_cases_use_xla_and_match_it(case):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2 if case.get("feature_group_count") else 4, 4))
  if "dimension_numbers" in case:  # channels first
    x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  kwargs = {"dimension_numbers": DN, **{k: v for k, v in case.items() if k != "lhs"}}
  if "lhs" in case:
    x, w = x.astype(case["lhs"]), w.astype(case["lhs"])
  ours = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", **kwargs))
  plain = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", **kwargs))
  np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(plain(x, w)))
  assert "Diffjax" not in ours.lower(x, w).compile().as_text()


def test_setting_xla_keeps_xla_convolutions(monkeypatch):
  x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
  monkeypatch.setenv("DIFFJAX_CPU_KERNELS", "xla")
  f = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN))
  assert "Diffjax" not in f.lower(x, w).compile().as_text()


def test_conv_layer_is_flax_conv_with_the_same_parameters_and_values():
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 4))
  ours, ref = conv(8, (3, 3), padding=((1, 1), (1, 1))), nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(ref.apply(params, x)), atol=1e-5)


def test_vmap_and_non_cpu_lowering_use_xla_elsewhere():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))  # a vmapped batch of batches
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  f = lambda a: conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=DN)
  got = jax.jit(jax.vmap(f))(x)
  want = jax.vmap(lambda a: _reference(a, w, (1, 1), "SAME"))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  # Lowered for TPU (possible without one), the same function has no oneDNN call in it.
  text = jax.jit(f).trace(x[0]).lower(lowering_platforms=("tpu",)).as_text()
  assert "Diffjax" not in text and "convolution" in text


@pytest.mark.parametrize(
  "x_shape, w_shape, strides, padding, match",
  [
    ((2, 5, 5, 3), (3, 3, 4, 4), (1, 1), ((1, 1), (1, 1)), "channels"),
    ((5, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), "x must be"),
    ((2, 5, 5, 3), (3, 3, 3, 4), (0, 1), ((1, 1), (1, 1)), "strides"),
    ((2, 5, 5, 3), (3, 3, 3, 4), (1, 1), ((-1, 1), (1, 1)), "padding"),
    ((2, 2, 2, 3), (5, 5, 3, 4), (1, 1), ((0, 0), (0, 0)), "larger than"),
  ],
)
def test_bad_arguments_are_named(x_shape, w_shape, strides, padding, match):
  from diffjax.onednn_conv import conv2d_nhwc

  with pytest.raises(ValueError, match=match):
    conv2d_nhwc(jnp.ones(x_shape), jnp.ones(w_shape), strides, padding)


@pytest.mark.parametrize(
  "batch, hw, cin, cout",
  [
    (1, (2, 32), 1, 16),  # one tile row, mostly padding
    (3, (9, 11), 17, 48),  # odd sizes: partial edge tiles; channels not a multiple of the vector width
    (2, (14, 14), 64, 64),  # the U-Net's attention level
    (5, (8, 8), 32, 32),  # tiles spanning more than one 48-tile block and image
    (2, (16, 20), 96, 32),  # F(4x4): the most input channels it takes
    (3, (13, 16), 40, 16),  # F(4x4) forward with a partial tile row; input gradient by oneDNN (40 channels)
    (1, (28, 28), 17, 64),  # F(4x4) with a scalar channel tail
    (3, (4, 4), 128, 64),  # F(2x2) on the smallest map it takes (the 8x8 U-Net's up block)
  ],
)
def test_winograd_forward_and_input_gradient_match_xla(batch, hw, cin, cout):
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (batch, *hw, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout)) / np.sqrt(9 * cin)
  pads = ((1, 1), (1, 1))
  assert winograd_tile(x.shape, w.shape, (1, 1), pads) == (4 if min(hw) >= 12 and cin <= 96 else 2)
  ours = lambda a, b: conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=DN)
  dy = jax.random.normal(keys[2], (batch, *hw, cout))
  got = jax.jit(lambda *a: _value_and_grads(ours, *a))(x, w, dy)
  want = jax.jit(lambda *a: _value_and_grads(lambda a, b: _reference(a, b, (1, 1), pads), *a))(x, w, dy)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-5, rtol=0, err_msg=name)
  loss = lambda a, b: jnp.sum(ours(a, b) * dy)
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  assert "DiffjaxWinogradConv3x3" in hlo and "DiffjaxOnednnConvFwd" not in hlo
  assert ("DiffjaxOnednnConvBwdData" in hlo) == (cin % 16 != 0)  # dx has cin output channels


def test_winograd_tile():
  pads = ((1, 1), (1, 1))
  tile = lambda h, w, c, o=16: winograd_tile((2, h, w, c), (3, 3, c, o), (1, 1), pads)
  assert tile(28, 28, 96) == tile(14, 14, 64) == tile(12, 40, 3) == 4
  assert tile(8, 8, 32) == tile(10, 40, 32) == 2  # small side: F(2x2)
  assert tile(28, 28, 128) == 2  # F(4x4) rounding grows with the channels
  assert tile(4, 4, 128) == tile(2, 8, 64) == 2
  assert tile(3, 5, 64) == tile(1, 15, 64) == 0  # under 16 positions: the direct kernel
  assert tile(28, 28, 32, o=24) == 0  # output channels not a multiple of 16
  assert winograd_tile((2, 8, 8, 8), (3, 3, 8, 16), (2, 2), pads) == 0
  assert winograd_tile((2, 8, 8, 8), (3, 3, 8, 16), (1, 1), ((0, 0), (0, 0))) == 0
  assert winograd_tile((2, 8, 8, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0))) == 0
  with pytest.raises(ValueError, match="x_shape"):
    winograd_tile((8, 8, 8), (3, 3, 8, 16), (1, 1), pads)


def test_winograd_switch(monkeypatch):
  pads = ((1, 1), (1, 1))
  monkeypatch.setenv(WINOGRAD_ENV, "0")
  assert winograd_tile((2, 6, 6, 8), (3, 3, 8, 16), (1, 1), pads) == 0
  x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((3, 3, 8, 16))
  f = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=DN))
  hlo = f.lower(x, w).compile().as_text()
  assert "DiffjaxOnednnConvFwd" in hlo and "DiffjaxWinograd" not in hlo
  monkeypatch.setenv(WINOGRAD_ENV, "yes")
  with pytest.raises(ValueError, match=WINOGRAD_ENV):
    winograd_tile((2, 6, 6, 8), (3, 3, 8, 16), (1, 1), pads)


# Lavin & Gray's kernel transforms G (arXiv:1509.09308), for the closed-form check of winograd_weights.
_G = {
  2: np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
  4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
}  # fmt: skip


@pytest.mark.parametrize("tile, cin, cout", [(2, 5, 16), (4, 3, 33)])
def test_winograd_weights_are_g_w_gt_and_feed_the_convolution(tile, cin, cout):
  w = jax.random.normal(jax.random.key(4), (3, 3, cin, cout))
  u = jax.jit(lambda k: winograd_weights(k, tile))(w)
  want = np.einsum("ar,rsco,bs->abco", _G[tile], np.asarray(w, np.float64), _G[tile])
  np.testing.assert_allclose(np.asarray(u), want, atol=1e-6, rtol=0)
  x = jax.random.normal(jax.random.key(5), (2, 9, 7, cin))
  y = jax.jit(lambda a, b: winograd_conv(a, b, tile))(x, u)
  ref = _reference(x, w, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5 * float(jnp.max(jnp.abs(ref))), rtol=0)


def test_winograd_weights_bad_arguments_are_named():
  with pytest.raises(ValueError, match="tile"):
    winograd_weights(jnp.ones((3, 3, 4, 16)), 3)
  with pytest.raises(ValueError, match="w must be"):
    winograd_weights(jnp.ones((5, 5, 4, 16)), 2)


def _computations(hlo: str) -> dict[str, str]:
  """HLO text by computation: name -> its body."""
  out = {}
  for block in hlo.split("\n\n"):
    head = block.strip().split("\n", 1)[0]
    if "{" in head and "(" in head:
      out[head.split(" (", 1)[0].removeprefix("ENTRY ").lstrip("%")] = block
  return out


def test_winograd_kernel_transform_is_hoisted_out_of_a_loop():
  """In a loop over fixed weights (a sampler's), XLA runs the kernel transform once, before the loop."""
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(7), (3, 3, 16, 16)) / 12.0
  step = lambda a, k: conv_general_dilated(a, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)

  def loop(a, k, n):
    return jax.lax.fori_loop(0, n, lambda i, a: step(a, k), a)

  compiled = jax.jit(loop).lower(x, w, jnp.int32(3)).compile()
  bodies = _computations(compiled.as_text())
  with_conv = [b for b in bodies.values() if "DiffjaxWinogradConv3x3" in b]
  with_transform = [b for b in bodies.values() if "DiffjaxWinogradWeights" in b]
  assert len(with_conv) == 1 and len(with_transform) == 1 and with_conv != with_transform
  assert "ENTRY" in with_transform[0]
  want = x
  for _ in range(3):
    want = _reference(want, w, (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(np.asarray(compiled(x, w, jnp.int32(3))), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize(
  "x_shape, u_shape, tile, match",
  [
    ((2, 6, 6, 8), (4, 4, 8, 16), 3, "tile"),
    ((6, 6, 8), (4, 4, 8, 16), 2, "x must be"),
    ((2, 6, 6, 8), (6, 6, 8, 16), 2, "u must be"),  # transformed for F(4x4), not F(2x2)
    ((2, 6, 6, 8), (4, 4, 5, 16), 2, "u must be"),  # channels differ from x's
  ],
)
def test_winograd_conv_bad_arguments_are_named(x_shape, u_shape, tile, match):
  with pytest.raises(ValueError, match=match):
    winograd_conv(jnp.ones(x_shape), jnp.ones(u_shape), tile)
