"""The blocked, hand-differentiated attention equals the plain einsum attention (forward and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import AttentionBlock, UNet, dot_product_attention
from diffjax.models.attention import resolve_attention_fn
from diffjax.models.attention_kernels import _pick_chunk, blocked_attention

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _qkv(b, l, s, h, d, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (b, l, h, d))
  k = jax.random.normal(kk, (b, s, h, d))
  v = jax.random.normal(kv, (b, s, h, d))
  g = jax.random.normal(kg, (b, l, h, d))
  return q, k, v, g


def _vjp(fn, q, k, v, g):
  out, pullback = jax.vjp(fn, q, k, v)
  return out, pullback(g)


@pytest.mark.parametrize(
  "shape, block_bytes",
  [
    ((2, 16, 16, 4, 8), 4 << 20),  # one block
    ((3, 49, 49, 2, 8), 49 * 49 * 4),  # one row per block: lax.map over 6 rows
    ((2, 64, 64, 3, 4), 3 * 64 * 64 * 4),  # blocks of 3 rows
    ((2, 10, 7, 2, 8), 1),  # cross-attention shape L != S, minimal blocks
  ],
)
def test_blocked_matches_einsum_forward_and_grads(shape, block_bytes):
  b, l, s, h, d = shape
  q, k, v, g = _qkv(b, l, s, h, d)
  blocked = lambda q, k, v: blocked_attention(q, k, v, block_bytes=block_bytes)
  out, grads = jax.jit(lambda *a: _vjp(blocked, *a))(q, k, v, g)
  ref_out, ref_grads = jax.jit(lambda *a: _vjp(dot_product_attention, *a))(q, k, v, g)
  assert out.shape == (b, l, h, d)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **TOL)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_blocked_is_stable_for_large_logits():
  """Logits of size ~100 must not overflow (max-subtraction / log-sum-exp)."""
  q, k, v, g = _qkv(1, 8, 8, 1, 4)
  q = q * 30.0
  out, grads = _vjp(blocked_attention, q, k, v, g)
  ref_out, ref_grads = _vjp(dot_product_attention, q, k, v, g)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-4)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3, rtol=1e-4)


def test_blocked_keeps_dtype_and_casts_grads():
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  k = jnp.ones((1, 4, 2, 8), jnp.float32)
  out, (dq, dk, dv) = _vjp(blocked_attention, q, k, k, jnp.ones((1, 4, 2, 8), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert dq.dtype == jnp.bfloat16 and dk.dtype == jnp.float32 and dv.dtype == jnp.float32


def test_blocked_rejects_bad_shapes():
  with pytest.raises(ValueError, match="q, k, v"):
    blocked_attention(jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)))
  with pytest.raises(ValueError, match="incompatible"):
    blocked_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 4)), jnp.ones((1, 4, 2, 4)))


def test_pick_chunk_divides_and_respects_budget():
  assert _pick_chunk(512, 256 * 256 * 4, 4 << 20) == 16
  assert _pick_chunk(6, 100, 250) == 2
  assert _pick_chunk(7, 100, 250) == 1
  assert _pick_chunk(4, 10, 1 << 30) == 4
  assert _pick_chunk(4, 10**9, 1) == 1


def test_resolve_attention_fn():
  assert resolve_attention_fn("xla") is dot_product_attention
  assert resolve_attention_fn("blocked") is blocked_attention
  want = blocked_attention if jax.default_backend() == "cpu" else dot_product_attention
  assert resolve_attention_fn("auto") is want
  with pytest.raises(ValueError, match="attention_impl"):
    resolve_attention_fn("flash")


def test_attention_block_impls_agree():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 16))
  variables = AttentionBlock(attention_head_dim=8, norm_num_groups=4).init(jax.random.PRNGKey(0), x)

  def run(impl):
    block = AttentionBlock(attention_head_dim=8, norm_num_groups=4, attention_impl=impl)
    loss = lambda p, x: jnp.sum(jnp.sin(block.apply(p, x)))
    return jax.value_and_grad(loss, argnums=(0, 1))(variables, x)

  (l_x, g_x), (l_b, g_b) = run("xla"), run("blocked")
  np.testing.assert_allclose(float(l_b), float(l_x), **TOL)
  for got, want in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_unet_attention_impls_agree_forward_and_grads():
  kwargs = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 4, "num_classes": 3}
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t, y = jnp.array([3, 500]), jnp.array([0, 2])
  params = UNet(**kwargs).init(jax.random.PRNGKey(0), x, t, y)["params"]

  def run(impl):
    model = UNet(attention_impl=impl, **kwargs)
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y)))
    return jax.jit(jax.value_and_grad(loss))(params)

  (l_x, g_x), (l_b, g_b) = run("xla"), run("blocked")
  np.testing.assert_allclose(float(l_b), float(l_x), **TOL)
  for got, want in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize(
  "shape",
  # head sizes 8 and 16 take the AVX-512 query-vector forward where the CPU has it: 49 and 20 queries
  # are whole blocks of 16 plus a short one; 49 and 33 keys leave remainders after the 4-key loop
  [(2, 49, 49, 3, 8), (3, 10, 7, 2, 16), (2, 20, 33, 2, 16), (2, 12, 20, 2, 5)],
)
@pytest.mark.parametrize("avx512", ["1", "0"])  # 0: the portable forward kernel for every head size
def test_native_cpu_kernel_matches_the_blocked_xla_kernel(shape, avx512, monkeypatch):
  from diffjax import cpu_kernels

  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  monkeypatch.setenv("DIFFJAX_CPU_AVX512", avx512)
  b, l, s, h, d = shape
  q, k, v, g = _qkv(b, l, s, h, d, seed=4)
  results, texts = {}, {}
  for setting in ("native", "xla"):
    monkeypatch.setenv("DIFFJAX_CPU_KERNELS", setting)
    f = jax.jit(lambda *a: _vjp(blocked_attention, *a))  # a new function per setting: traced again
    results[setting], texts[setting] = f(q, k, v, g), f.lower(q, k, v, g).compile().as_text()
  assert "DiffjaxAttentionFwd" in texts["native"] and "DiffjaxAttentionBwd" in texts["native"]
  assert f"vector = {avx512}" in texts["native"]  # the setting reached the kernel (no stale trace)
  assert "DiffjaxAttention" not in texts["xla"]
  for got, want in zip(jax.tree.leaves(results["native"]), jax.tree.leaves(results["xla"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_thread_setting_reaches_the_native_kernels_after_a_first_trace(monkeypatch):
  """DIFFJAX_CPU_THREADS is read at each trace, forward and backward (platform_dependent caches the
  traces of its branch functions: a read inside them would keep the first value), and results agree."""
  import re

  from diffjax import cpu_kernels

  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  q, k, v, g = _qkv(3, 20, 20, 2, 8, seed=5)
  results = {}
  for threads in ("1", "3"):
    monkeypatch.setenv("DIFFJAX_CPU_THREADS", threads)
    f = jax.jit(lambda *a: _vjp(blocked_attention, *a))  # a new function: traced again
    text = f.lower(q, k, v, g).compile().as_text()
    for target in ("DiffjaxAttentionFwd", "DiffjaxAttentionBwd"):
      (line,) = [x for x in text.splitlines() if f'custom_call_target="{target}"' in x]
      assert re.search(rf"threads = {threads}\b", line), (target, threads)
    results[threads] = f(q, k, v, g)
  for a, b in zip(jax.tree.leaves(results["1"]), jax.tree.leaves(results["3"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
