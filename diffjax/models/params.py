"""Small helpers for inspecting parameter pytrees."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["count_params"]


def count_params(params: Any) -> int:
  """Total number of scalar entries in a parameter pytree.

  Args:
      params: Any pytree of arrays, e.g. ``variables["params"]`` or the full
          ``variables`` dict returned by ``Module.init``. Shape-only leaves
          (``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) are counted too.

  Returns:
      Sum of ``prod(leaf.shape)`` over all leaves.
  """
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
