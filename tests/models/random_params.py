"""Random parameters for a Flax module without compiling its ``init`` (tests that only need some weights)."""

import jax
import numpy as np


def random_params(module, *args, seed: int = 0, scale: float = 0.3, **kwargs):
  """``module``'s ``params`` tree (shapes from ``jax.eval_shape``) filled with N(0, scale^2) float32 draws.

  Unlike ``jax.jit(module.init)`` nothing is compiled, so a test pays only for the programs it checks.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)
