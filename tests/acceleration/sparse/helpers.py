"""Random parameters for the sparse tests without compiling ``Module.init`` (slow on XLA:CPU)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(module, *args, seed: int = 0):
  """A parameter tree shaped like ``module.init(key, *args)["params"]``, drawn with numpy: kernels
  ``N(0, 1 / fan_in)``, GroupNorm scales ``1 + N(0, 0.1^2)``, biases ``N(0, 0.1^2)``, embeddings ``N(0, 1)``."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      a = rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
    elif name == "scale":
      a = 1.0 + 0.1 * rng.normal(size=s.shape)
    elif name == "embedding":
      a = rng.normal(size=s.shape)
    else:
      a = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(a, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
