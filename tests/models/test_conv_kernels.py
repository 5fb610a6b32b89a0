"""The blocked-weight-gradient convolution equals ``lax.conv_general_dilated`` (forward and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffjax.models import conv_kernels
from diffjax.models.conv_kernels import conv2d, resolve_conv_impl

TOL = {"atol": 1e-5, "rtol": 1e-5}
DN = ("NHWC", "HWIO", "NHWC")


def _vjp(fn, x, w, g):
  out, pull = jax.vjp(fn, x, w)
  return out, pull(g)


@pytest.mark.parametrize(
  "x_shape, k_shape, strides, padding, block_bytes",
  [
    ((3, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 4 << 20),  # one block
    ((4, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 1),  # one image per block (scan over 4)
    (
      (4, 7, 9, 3),
      (3, 3, 3, 5),
      (2, 2),
      ((1, 1), (1, 1)),
      2 * 4 * 5 * 27 * 4,
    ),  # stride 2, odd sizes, 2 per block
    ((2, 6, 6, 2), (3, 3, 2, 3), (2, 2), ((0, 1), (0, 1)), 4 << 20),  # asymmetric padding (VAE downsampler)
    ((2, 5, 5, 3), (2, 3, 3, 4), (1, 1), ((0, 0), (1, 1)), 4 << 20),  # non-square kernel, VALID rows
  ],
)
def test_matches_lax_forward_and_grads(x_shape, k_shape, strides, padding, block_bytes):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, x_shape), 0.3 * jax.random.normal(kw, k_shape)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  g = jax.random.normal(jax.random.PRNGKey(1), jax.eval_shape(ref, x, w).shape)
  ours = lambda x, w: conv2d(x, w, strides=strides, padding=padding, impl="blocked", block_bytes=block_bytes)
  out, (dx, dw) = jax.jit(lambda: _vjp(ours, x, w, g))()
  ref_out, (rdx, rdw) = jax.jit(lambda: _vjp(ref, x, w, g))()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))  # forward is XLA's own conv
  np.testing.assert_allclose(np.asarray(dx), np.asarray(rdx), **TOL)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(rdw), **TOL)


def test_flax_conv_adapter_same_params_and_grads():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 3))
  plain = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))
  fast = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv_kernels.conv_general_dilated)
  params = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(fast.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
  grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x))))(params)
  for got, want in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
  # String padding, dilation and groups fall back to lax unchanged.
  same = nn.Conv(
    4, (3, 3), padding="SAME", kernel_dilation=2, conv_general_dilated=conv_kernels.conv_general_dilated
  )
  ref = nn.Conv(4, (3, 3), padding="SAME", kernel_dilation=2)
  p = ref.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(np.asarray(same.apply(p, x)), np.asarray(ref.apply(p, x)))


def test_bfloat16_grads_are_finite():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4)).astype(jnp.bfloat16)
  loss = lambda w: jnp.sum(conv2d(x, w, padding=((1, 1), (1, 1)), impl="blocked").astype(jnp.float32))
  dw = jax.grad(loss)(w)
  assert dw.dtype == jnp.bfloat16 and dw.shape == w.shape and bool(jnp.all(jnp.isfinite(dw)))


def test_errors():
  with pytest.raises(ValueError, match="channels"):
    conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 4)))
  with pytest.raises(ValueError, match="kernel"):
    conv2d(jnp.ones((4, 4, 3)), jnp.ones((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="conv_impl"):
    resolve_conv_impl("fast")
  assert resolve_conv_impl("auto") == ("blocked" if jax.default_backend() == "cpu" else "xla")
