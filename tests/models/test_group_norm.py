"""The fused per-channel GroupNorm (+SiLU) equals Flax's ``nn.GroupNorm`` (forward and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.group_norm import GroupNorm, group_norm, resolve_norm_impl
from diffjax.models.resnet import group_norm as make_group_norm

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _flax(x, scale, bias, groups, silu):
  y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False).apply(
    {"params": {"scale": scale, "bias": bias}}, x
  )
  return nn.silu(y) if silu else y


def _inputs(shape, seed=0, offset=0.0):
  kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
  c = shape[-1]
  x = 2.0 * jax.random.normal(kx, shape) + offset
  return x, jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,)), jax.random.normal(kg, shape)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
  "shape, groups, offset",
  [((2, 8, 8, 16), 4, 0.0), ((3, 5, 7, 12), 3, 3.0), ((2, 6, 8), 2, 0.0), ((1, 4, 4, 8), 8, -2.0)],
)
def test_matches_flax_forward_and_grads(shape, groups, offset, silu):
  x, scale, bias, g = _inputs(shape, offset=offset)

  def run(fn):
    out, pull = jax.vjp(fn, x, scale, bias)
    return out, pull(g)

  fused = lambda *a: group_norm(*a, num_groups=groups, silu=silu)
  out, grads = jax.jit(lambda: run(fused))()
  ref_out, ref_grads = jax.jit(lambda: run(lambda *a: _flax(*a, groups, silu)))()
  assert out.shape == shape and out.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **TOL)
  for got, want in zip(grads, ref_grads):
    scale_ = max(1.0, float(jnp.max(jnp.abs(want))))  # dscale/dbias are sums over B*H*W terms
    np.testing.assert_allclose(np.asarray(got) / scale_, np.asarray(want) / scale_, **TOL)


def test_module_has_flax_parameters_and_dtype():
  x = jnp.ones((2, 4, 4, 8))
  ours = GroupNorm(num_groups=4, epsilon=1e-5, dtype=jnp.bfloat16)
  params = ours.init(jax.random.PRNGKey(0), x)
  ref = nn.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  assert all(
    a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref))
  )
  assert ours.apply(params, x).dtype == jnp.bfloat16


def test_bfloat16_input_is_finite_with_float32_grads():
  x, scale, bias, _ = _inputs((2, 8, 8, 16))
  loss = lambda s, b: jnp.sum(
    group_norm(x.astype(jnp.bfloat16), s, b, num_groups=4, silu=True).astype(jnp.float32)
  )
  ds, db = jax.grad(loss, argnums=(0, 1))(scale, bias)
  assert ds.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(ds))) and bool(jnp.all(jnp.isfinite(db)))


def test_resnet_helper_same_tree_either_impl():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 8))

  class Wrap(nn.Module):
    impl: str

    @nn.compact
    def __call__(self, x):
      return make_group_norm(4, 1e-5, jnp.float32, "norm1", impl=self.impl, silu=True)(x)

  p_xla = Wrap("xla").init(jax.random.PRNGKey(0), x)
  p_fused = Wrap("fused").init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(p_xla) == jax.tree.structure(p_fused)
  np.testing.assert_allclose(Wrap("fused").apply(p_xla, x), Wrap("xla").apply(p_xla, x), **TOL)


def test_errors():
  x = jnp.ones((2, 4, 4, 6))
  with pytest.raises(ValueError, match="num_groups"):
    group_norm(x, jnp.ones(6), jnp.zeros(6), num_groups=4)
  with pytest.raises(ValueError, match="spatial"):
    group_norm(jnp.ones((2, 6)), jnp.ones(6), jnp.zeros(6), num_groups=2)
  with pytest.raises(ValueError, match="scale and bias"):
    group_norm(x, jnp.ones(3), jnp.zeros(6), num_groups=2)
  with pytest.raises(ValueError, match="norm_impl"):
    resolve_norm_impl("fast")
  assert resolve_norm_impl("auto") == ("fused" if jax.default_backend() == "cpu" else "xla")


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
  "shape, groups, offset",
  # 24 channels: the generic kernel; 48 and 128: the AVX-512 one (whole vectors of channels) where the
  # CPU has it, including a mean far from zero and channel means spread within a group (below)
  [((5, 6, 7, 24), 6, 1.5), ((3, 9, 11, 48), 8, 1.5), ((2, 4, 4, 128), 32, 0.0), ((2, 5, 6, 32), 4, 40.0)],
)
@pytest.mark.parametrize("avx512", ["1", "0"])  # 0: the portable forward kernel for every shape
def test_native_cpu_kernel_matches_the_xla_formulation(shape, groups, offset, silu, avx512, monkeypatch):
  from diffjax import cpu_kernels

  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  monkeypatch.setenv("DIFFJAX_CPU_AVX512", avx512)
  x, scale, bias, g = _inputs(shape, seed=3, offset=offset)
  x = x + jnp.linspace(-3.0, 3.0, shape[-1])  # channel means differ within each group
  fn = lambda *a: group_norm(*a, num_groups=groups, silu=silu)

  def value_and_grads(*a):
    out, pull = jax.vjp(fn, *a)
    return (out, *pull(g))

  run = lambda: jax.jit(lambda *a: value_and_grads(*a))  # a new function: traced again
  native_fn = run()
  results = {"native": native_fn(x, scale, bias)}
  native_text = native_fn.lower(x, scale, bias).compile().as_text()
  assert "DiffjaxGroupNormFwd" in native_text and f"vector = {avx512}" in native_text
  monkeypatch.setenv("DIFFJAX_CPU_KERNELS", "xla")
  xla_fn = run()
  results["xla"] = xla_fn(x, scale, bias)
  assert "DiffjaxGroupNorm" not in xla_fn.lower(x, scale, bias).compile().as_text()
  for got, want in zip(results["native"], results["xla"]):
    s = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(np.asarray(got) / s, np.asarray(want) / s, atol=1e-5, rtol=0)


def test_bfloat16_keeps_the_xla_formulation():
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  f = jax.jit(lambda a: group_norm(a, jnp.ones(8), jnp.zeros(8), num_groups=4))
  assert "DiffjaxGroupNorm" not in f.lower(x).compile().as_text()
  assert f(x).dtype == jnp.bfloat16
