"""Token dense layers as oneDNN 1x1 convolutions (diffjax.onednn_dense): equal to XLA's dot, forward and
gradients; the row thresholds pick the path; everything not covered is ``lax.dot_general``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import cpu_kernels, onednn_dense
from diffjax.models.conv import dense

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")

DIMS = (((2,), (0,)), ((), ()))


def _value_and_grads(fn, x, w, dy):
  y, pull = jax.vjp(fn, x, w)
  return (y, *pull(dy))


def _targets(fn, x, w) -> set[str]:
  hlo = jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), argnums=(0, 1))).lower(x, w).compile().as_text()
  return {t for t in ("ConvFwd", "ConvBwdData", "ConvBwdWeights") if f"DiffjaxOnednn{t}" in hlo}


@pytest.mark.parametrize(
  "shape, out, backward_rows, want",
  [
    ((3, 50, 24), 40, 1, {"ConvBwdData", "ConvBwdWeights"}),  # odd batch split over threads
    ((4, 36, 16), 16, 144, {"ConvBwdData", "ConvBwdWeights"}),  # at the threshold
    ((2, 9, 8), 12, 19, set()),  # below: XLA's dots
  ],
)
def test_forward_and_gradients_match_xla(monkeypatch, shape, out, backward_rows, want):
  monkeypatch.setattr(onednn_dense, "BACKWARD_MIN_ROWS", backward_rows)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape)
  w = jax.random.normal(keys[1], (shape[-1], out)) / np.sqrt(shape[-1])
  dy = jax.random.normal(keys[2], (*shape[:-1], out))
  ours = lambda a, b: onednn_dense.dot_general(a, b, DIMS)
  ref = lambda a, b: jax.lax.dot_general(a, b, DIMS, precision="highest")
  got = jax.jit(lambda *a: _value_and_grads(ours, *a))(x, w, dy)
  ref_values = jax.jit(lambda *a: _value_and_grads(ref, *a))(x, w, dy)
  for name, g, r in zip(("y", "dx", "dw"), got, ref_values):
    assert g.shape == r.shape, name
    scale = max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=1e-5, rtol=0, err_msg=name)
  assert _targets(ours, x, w) == want


def test_dense_layer_keeps_nn_dense_params_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 512, 8))  # 1024 rows: oneDNN backward by default
  layer, plain = dense(6, name="proj"), nn.Dense(6)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, layer.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(layer.apply(params, x), plain.apply(params, x), atol=1e-5, rtol=0)
  grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (layer, plain)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), *grads)
  assert _targets(lambda a, b: onednn_dense.dot_general(a, b, DIMS), x, params["params"]["kernel"]) == {
    "ConvBwdData",
    "ConvBwdWeights",
  }


@pytest.mark.parametrize(
  "lhs, rhs, dims, kwargs",
  [
    ((8192, 8), (8, 4), (((1,), (0,)), ((), ())), {}),  # rank 2 (time embeddings): XLA
    ((2, 4096, 8), (4, 8), (((2,), (1,)), ((), ())), {}),  # another contraction
    ((2, 4096, 8), (8, 4), DIMS, {"precision": jax.lax.Precision.HIGHEST}),
    ((2, 4096, 8), (8, 4), DIMS, {"preferred_element_type": jnp.bfloat16}),
  ],
)
def test_uncovered_calls_are_plain_dot_general(lhs, rhs, dims, kwargs):
  a = jnp.ones(lhs)
  b = jnp.ones(rhs)
  fn = lambda a, b: onednn_dense.dot_general(a, b, dims, **kwargs)
  np.testing.assert_array_equal(fn(a, b), jax.lax.dot_general(a, b, dims, **kwargs))
  assert "DiffjaxOnednn" not in jax.jit(fn).lower(a, b).compile().as_text()


def test_bfloat16_inputs_are_plain_dot_general():
  x = jnp.ones((2, 4096, 8), jnp.bfloat16)
  w = jnp.ones((8, 4), jnp.bfloat16)
  assert (
    "DiffjaxOnednn" not in jax.jit(lambda a, b: onednn_dense.dot_general(a, b, DIMS)).lower(x, w).as_text()
  )


@pytest.mark.parametrize("use_bias, rows", [(True, (3, 50)), (False, (2, 7)), (True, (1, 5))])
def test_dense_layer_fuses_the_bias_and_matches_nn_dense(use_bias, rows):
  """diffjax.models.conv.Dense: the native forward with the bias inside (short blocks, odd row counts),
  values and all gradients (kernel, bias, input) equal to nn.Dense's."""
  x = jax.random.normal(jax.random.key(2), (*rows, 24))
  layer, plain = dense(40, use_bias=use_bias), nn.Dense(40, use_bias=use_bias)
  params = plain.init(jax.random.key(3), x)
  if use_bias:  # a non-zero bias, so that fusing it is checked
    params = jax.tree.map(lambda a: a + 0.5 if a.ndim == 1 else a, params)
  np.testing.assert_allclose(layer.apply(params, x), plain.apply(params, x), atol=1e-5, rtol=0)

  def grads(m):
    return jax.grad(lambda p, a: jnp.sum(jnp.sin(m.apply(p, a))), argnums=(0, 1))(params, x)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), grads(layer), grads(plain)
  )
  assert "DiffjaxDense" in jax.jit(layer.apply).lower(params, x).compile().as_text()


def test_dense_layer_outside_the_fused_path_is_nn_dense():
  x = jnp.ones((2, 6, 8), jnp.bfloat16)
  layer = dense(4, dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  assert "DiffjaxDense" not in jax.jit(layer.apply).lower(params, x).compile().as_text()
  np.testing.assert_array_equal(layer.apply(params, x), nn.Dense(4, dtype=jnp.bfloat16).apply(params, x))
  x2 = jnp.ones((6, 8))  # rank 2: not token rows
  params2 = layer.init(jax.random.key(0), x2)
  assert "DiffjaxDense" not in jax.jit(dense(4).apply).lower(params2, x2).compile().as_text()


@pytest.mark.parametrize(
  "x, w, b, match",
  [
    ((2, 5, 8), (6, 4), (4,), "x must be"),  # C mismatch
    ((2, 5, 8), (8,), (4,), "x must be"),  # w not [C, O]
    ((2, 5, 8), (8, 4), (3,), "b must be"),
  ],
)
def test_dense_bias_bad_arguments_are_named(x, w, b, match):
  with pytest.raises(ValueError, match=match):
    onednn_dense.dense_bias(jnp.ones(x), jnp.ones(w), jnp.ones(b))
