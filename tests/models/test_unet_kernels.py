"""The U-Net with every CPU fast path (fused GroupNorm, blocked attention) computes the same function and
gradients, with the same parameters, as with the plain XLA forms."""

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import UNet

KWARGS = {
  "in_channels": 3,
  "out_channels": 3,
  "block_out_channels": (8, 16),
  "layers_per_block": 1,
  "attention_levels": (False, True),
  "norm_num_groups": 4,
  "num_classes": 3,
}
PLAIN = {"norm_impl": "xla", "attention_impl": "xla"}
FAST = {"norm_impl": "fused", "attention_impl": "blocked"}


def test_fast_paths_same_tree_forward_and_grads():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  t, y = jnp.array([3, 700]), jnp.array([0, 3])
  params = UNet(**PLAIN, **KWARGS).init(jax.random.PRNGKey(0), x, t, y)["params"]
  fast_shapes = jax.eval_shape(UNet(**FAST, **KWARGS).init, jax.random.PRNGKey(0), x, t, y)["params"]
  assert jax.tree.structure(fast_shapes) == jax.tree.structure(params)

  def run(impls):
    model = UNet(**impls, **KWARGS)

    def loss(p):
      out = model.apply({"params": p}, x, t, y)
      return jnp.mean(jnp.square(out - x)), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  ((l0, o0), g0), ((l1, o1), g1) = run(PLAIN), run(FAST)
  np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), atol=1e-6, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
