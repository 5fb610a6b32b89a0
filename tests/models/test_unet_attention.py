"""Attention core and spatial self-attention block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import AttentionBlock, dot_product_attention


def naive_attention(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, l, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      logits = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, hi] = w @ v[bi, :, hi]
  return out


def test_dot_product_attention_matches_naive():
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(kq, (2, 5, 3, 4))
  k = jax.random.normal(kk, (2, 7, 3, 4))
  v = jax.random.normal(kv, (2, 7, 3, 4))
  out = dot_product_attention(q, k, v)
  assert out.shape == (2, 5, 3, 4)
  np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v), atol=1e-5)


def test_dot_product_attention_keeps_dtype():
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  assert dot_product_attention(q, q, q).dtype == jnp.bfloat16


def test_dot_product_attention_rejects_bad_shapes():
  with pytest.raises(ValueError, match="q, k, v"):
    dot_product_attention(jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)))
  with pytest.raises(ValueError, match="incompatible"):
    dot_product_attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 4)), jnp.ones((1, 4, 2, 4)))


def test_attention_block_names_residual_and_heads():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))
  block = AttentionBlock(attention_head_dim=8, norm_num_groups=4)
  variables = block.init(jax.random.PRNGKey(2), x)
  params = variables["params"]
  assert set(params) == {"group_norm", "to_q", "to_k", "to_v", "to_out_0"}
  assert params["to_q"]["kernel"].shape == (16, 16)
  y = block.apply(variables, x)
  assert y.shape == x.shape
  assert not np.allclose(np.asarray(y), np.asarray(x))
  # Zero output projection -> pure residual.
  zeroed = jax.tree_util.tree_map(jnp.zeros_like, params["to_out_0"])
  y0 = block.apply({"params": {**params, "to_out_0": zeroed}}, x)
  np.testing.assert_allclose(np.asarray(y0), np.asarray(x), atol=1e-6)


def test_attention_block_uses_head_split():
  """Swapping in a recording attention_fn shows heads = C // attention_head_dim."""
  seen = {}

  def record(q, k, v):
    seen["shape"] = q.shape
    return dot_product_attention(q, k, v)

  x = jnp.ones((1, 2, 3, 32))
  block = AttentionBlock(attention_head_dim=8, norm_num_groups=8, attention_fn=record)
  block.init(jax.random.PRNGKey(0), x)
  assert seen["shape"] == (1, 6, 4, 8)


def test_attention_block_rejects_indivisible_channels():
  with pytest.raises(ValueError, match="attention_head_dim"):
    AttentionBlock(attention_head_dim=6, norm_num_groups=4).init(
      jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 16))
    )
