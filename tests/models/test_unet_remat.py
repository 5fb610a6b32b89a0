"""Rematerialisation and bfloat16 compute as U-Net options: same parameters, same function."""

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import UNet

KWARGS = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 4, "num_classes": 3}


def _inputs():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  return x, jnp.array([3, 500]), jnp.array([0, 2])


def test_remat_same_tree_forward_and_grads():
  x, t, y = _inputs()
  params = UNet(**KWARGS).init(jax.random.PRNGKey(0), x, t, y)["params"]
  remat_shapes = jax.eval_shape(UNet(remat=True, **KWARGS).init, jax.random.PRNGKey(0), x, t, y)["params"]
  assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)

  def run(remat):
    model = UNet(remat=remat, dropout=0.2, **KWARGS)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y, train=True, rngs=rngs)))
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = run(False), run(True)
  np.testing.assert_allclose(float(l1), float(l0), atol=1e-5, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_bfloat16_remat_shapes_and_finite_grads():
  x, t, y = _inputs()
  model = UNet(dtype=jnp.bfloat16, remat=True, **KWARGS)
  params = model.init(jax.random.PRNGKey(0), x, t, y)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.jit(model.apply)({"params": params}, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, y).astype(jnp.float32)))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.dtype == jnp.float32 and g.shape == p.shape
    assert bool(jnp.all(jnp.isfinite(g)))
