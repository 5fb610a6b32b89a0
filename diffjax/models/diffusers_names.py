"""Mapping diffusers ``UNet2DModel`` state dicts onto the diffjax ``UNet`` tree.

diffusers (PyTorch, NCHW) names parameters like
``down_blocks.0.resnets.1.conv1.weight``; the Flax tree of
:class:`diffjax.models.UNet` holds the same tensor at
``down_blocks_0/resnets_1/conv1/kernel``. The rules are:

* a numeric path segment is joined to the previous one with ``_``
  (``down_blocks.0`` -> ``down_blocks_0``, ``to_out.0`` -> ``to_out_0``);
* ``weight`` becomes ``kernel`` (conv / linear), ``scale`` (GroupNorm) or
  ``embedding`` (class embedding); ``bias`` stays ``bias``;
* conv kernels are transposed OIHW -> HWIO and linear weights ``[out, in]`` ->
  ``[in, out]``;
* legacy attention names (``query``, ``key``, ``value``, ``proj_attn``) are
  mapped to ``to_q``, ``to_k``, ``to_v``, ``to_out_0``.

This module does not import torch: pass NumPy arrays, or torch tensors (they
are converted with ``.detach().cpu().numpy()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["diffusers_key_to_path", "convert_diffusers_weight", "diffusers_to_flax_params"]

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def diffusers_key_to_path(key: str, ndim: int) -> tuple[str, ...]:
  """Flax parameter path for one diffusers state-dict key.

  Args:
      key: diffusers key, e.g. ``"mid_block.attentions.0.to_out.0.weight"``.
      ndim: Rank of the tensor stored under ``key`` (distinguishes GroupNorm
          ``weight`` (1-D) from conv/linear weights).

  Returns:
      Path tuple, e.g. ``("mid_block", "attentions_0", "to_out_0", "kernel")``.

  Raises:
      ValueError: If ``key`` does not end with ``weight`` or ``bias``.
  """
  parts: list[str] = []
  for seg in key.split("."):
    if seg.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{seg}"
    else:
      parts.append(_LEGACY_ATTENTION.get(seg, seg))
  leaf, modules = parts[-1], parts[:-1]
  if leaf == "bias":
    return (*modules, "bias")
  if leaf != "weight":
    raise ValueError(f"unsupported diffusers key {key!r}: expected '.weight' or '.bias'")
  if modules and modules[-1] == "class_embedding":
    return (*modules, "embedding")
  if ndim == 1:
    return (*modules, "scale")
  return (*modules, "kernel")


def convert_diffusers_weight(key: str, value: Any) -> np.ndarray:
  """Converts one diffusers tensor to the Flax layout.

  Args:
      key: diffusers key (used to recognise the class-embedding table).
      value: Tensor: conv ``[O, I, kh, kw]``, linear ``[out, in]``, embedding
          ``[N, D]`` or 1-D.

  Returns:
      Float32 NumPy array: conv ``[kh, kw, I, O]``, linear ``[in, out]``,
      embedding and 1-D tensors unchanged.
  """
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  arr = np.asarray(value, dtype=np.float32)
  path = diffusers_key_to_path(key, arr.ndim)
  if path[-1] != "kernel":
    return arr
  if arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  if arr.ndim == 2:
    return arr.T
  raise ValueError(f"unexpected rank {arr.ndim} for {key!r}")


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  if path[-1] in tree:
    raise ValueError(f"two diffusers keys map to {'/'.join(path)}")
  tree[path[-1]] = value


def diffusers_to_flax_params(state_dict: Mapping[str, Any], template: Any | None = None) -> dict:
  """Converts a diffusers ``UNet2DModel`` state dict to a diffjax params tree.

  Args:
      state_dict: ``{key: tensor}`` from ``UNet2DModel.state_dict()``.
      template: Optional params tree (arrays or ``jax.ShapeDtypeStruct``, e.g.
          from ``jax.eval_shape(model.init, ...)["params"]``) to validate
          against: every leaf must be present with the same shape and no extra
          leaves are allowed.

  Returns:
      Nested ``dict`` of float32 NumPy arrays usable as ``{"params": tree}``.

  Raises:
      ValueError: On unknown keys, missing/unexpected leaves or shape
          mismatches w.r.t. ``template`` (all problems are listed).
  """
  tree: dict = {}
  for key, value in state_dict.items():
    arr = convert_diffusers_weight(key, value)
    _set(tree, diffusers_key_to_path(key, np.ndim(value)), arr)
  if template is None:
    return tree

  def flat(t: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(t)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}

  got, want = flat(tree), flat(template)
  problems = [f"missing: {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected: {k}" for k in sorted(set(got) - set(want))]
  problems += [
    f"shape mismatch at {k}: diffusers {got[k]} vs diffjax {want[k]}"
    for k in sorted(set(got) & set(want))
    if got[k] != want[k]
  ]
  if problems:
    raise ValueError("diffusers state dict does not match the UNet:\n" + "\n".join(problems))
  return tree
