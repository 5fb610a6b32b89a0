import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.guidance import classifier_free_guidance, drop_labels


def _toy_model(calls):
  def model_fn(params, x, t, cond):
    calls.append(x.shape[0])
    return x * params + cond[:, None].astype(x.dtype)

  return model_fn


def test_guidance_combination_and_single_batched_forward():
  calls = []
  mf = _toy_model(calls)
  x = jnp.ones((3, 4))
  t = jnp.zeros((3,), jnp.int32)
  labels = jnp.array([1, 2, 3])
  null = jnp.full((3,), 10)
  cond_out = mf(2.0, x, t, labels)
  unc_out = mf(2.0, x, t, null)
  calls.clear()
  for w in [0.0, 1.0, 3.0]:
    g = classifier_free_guidance(mf, guidance_scale=w, null_cond=null)(2.0, x, t, labels)
    np.testing.assert_allclose(g, unc_out + w * (cond_out - unc_out), rtol=1e-6)
  assert calls == [6, 6, 6]
  per_sample = classifier_free_guidance(mf, guidance_scale=jnp.array([0.0, 1.0, 2.0]), null_cond=null)
  out = per_sample(2.0, x, t, labels)
  np.testing.assert_allclose(out[1], cond_out[1])
  np.testing.assert_allclose(out[0], unc_out[0])


def test_guidance_scale_traced_no_recompile():
  mf = _toy_model([])
  null = jnp.full((2,), 10)

  @jax.jit
  def f(w, x):
    return classifier_free_guidance(mf, guidance_scale=w, null_cond=null)(
      1.0, x, jnp.zeros(2, jnp.int32), jnp.array([1, 2])
    )

  a = f(1.0, jnp.ones((2, 3)))
  b = f(4.0, jnp.ones((2, 3)))
  assert f._cache_size() == 1
  assert not np.allclose(a, b)


def test_skip_unconditional_at_one_runs_one_pass_and_matches():
  calls = []
  mf = _toy_model(calls)
  x = jnp.arange(12.0).reshape(3, 4)
  t = jnp.zeros((3,), jnp.int32)
  labels, null = jnp.array([1, 2, 3]), jnp.full((3,), 10)
  plain = classifier_free_guidance(mf, guidance_scale=1.0, null_cond=null)(2.0, x, t, labels)
  calls.clear()
  fast = classifier_free_guidance(mf, guidance_scale=1.0, null_cond=null, skip_unconditional_at_one=True)
  np.testing.assert_allclose(fast(2.0, x, t, labels), plain, rtol=1e-6)
  assert calls == [3]  # a concrete w = 1: only the conditional pass is traced

  @jax.jit
  def traced(w):
    g = classifier_free_guidance(mf, guidance_scale=w, null_cond=null, skip_unconditional_at_one=True)
    return g(2.0, x, t, labels)

  for w in [0.0, 1.0, 3.0]:
    want = classifier_free_guidance(mf, guidance_scale=w, null_cond=null)(2.0, x, t, labels)
    np.testing.assert_allclose(traced(w), want, rtol=1e-6)
  assert traced._cache_size() == 1
  per_sample = jnp.array([1.0, 1.0, 2.0])  # a [B] scale always runs both passes
  out = classifier_free_guidance(mf, guidance_scale=per_sample, null_cond=null, skip_unconditional_at_one=True)(
    2.0, x, t, labels
  )
  want = classifier_free_guidance(mf, guidance_scale=per_sample, null_cond=null)(2.0, x, t, labels)
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_guidance_scale_wrong_shape():
  mf = _toy_model([])
  g = classifier_free_guidance(mf, guidance_scale=jnp.ones((5,)), null_cond=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="guidance_scale"):
    g(1.0, jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), jnp.array([1, 2]))


def test_drop_labels_rate():
  labels = jnp.zeros((20000,), jnp.int32)
  out = drop_labels(jax.random.key(0), labels, null_label=10, p=0.1)
  assert set(np.unique(out).tolist()) == {0, 10}
  assert abs(float(jnp.mean(out == 10)) - 0.1) < 0.01
