"""PyTorch state dicts (diffusers / transformers names) <-> diffjax parameter trees, checked leaf by leaf.

One rule set covers every imported model (``UNet2DConditionModel``, ``UNet2DModel``, ``AutoencoderKL``,
``ControlNetModel``, ``CLIPTextModel``), whose Flax trees mirror the PyTorch module names:

* a numeric key segment joins the previous one with ``_`` (``down_blocks.0`` -> ``down_blocks_0``,
  ``to_out.0`` -> ``to_out_0``, ``encoder.layers.3`` -> ``encoder/layers_3``), except diffusers'
  ``linear_1``/``linear_2`` which are names of their own;
* ``weight`` becomes whichever of ``kernel`` (conv / linear), ``scale`` (norms) or ``embedding`` the target
  module has; ``bias`` stays;
* conv kernels go OIHW -> HWIO, linear weights ``[out, in]`` -> ``[in, out]`` (attention projections
  stored as ``[C, C, 1, 1]`` convs in old VAE checkpoints are squeezed); embeddings and norms are unchanged;
* the legacy VAE attention names ``query``/``key``/``value``/``proj_attn`` read as
  ``to_q``/``to_k``/``to_v``/``to_out.0``.

:func:`to_params` refuses anything that does not fill the target tree exactly, naming each missing,
unexpected or mis-shaped tensor; :func:`to_state_dict` is its inverse (current names), so export then
import is exact. No torch: NumPy arrays in and out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

__all__ = ["flax_path_to_key", "key_to_flax_path", "to_params", "to_state_dict"]

_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_UNNUMBERED = {"linear_1", "linear_2"}  # diffusers TimestepEmbedding: names, not list entries
_NUMBERED = re.compile(r"^(.+)_(\d+)$")
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_MAX_LISTED = 25


def key_to_flax_path(key: str, leaves: Mapping[tuple[str, ...], Any]) -> tuple[str, ...]:
  """The Flax parameter path of a PyTorch key, resolved against the target's leaves.

  Args:
      key: e.g. ``"down_blocks.0.attentions.1.proj_in.weight"``.
      leaves: The target's flattened tree ``{path: leaf}`` (picks ``kernel``/``scale``/``embedding``).

  Returns:
      e.g. ``("down_blocks_0", "attentions_1", "proj_in", "kernel")``; for a ``weight`` whose module has
      none of the three leaves, the ``kernel`` path (reported as unexpected by the caller).

  Raises:
      ValueError: If ``key`` ends in neither ``weight`` nor ``bias``.
  """
  parts: list[str] = []
  for seg in key.split("."):
    if seg.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{seg}"
    else:
      parts.append(_LEGACY.get(seg, seg))
  *modules, leaf = parts
  if leaf == "bias":
    return (*modules, "bias")
  if leaf != "weight":
    raise ValueError(f"key {key!r} ends in neither '.weight' nor '.bias'")
  for name in _WEIGHT_LEAVES:
    if (*modules, name) in leaves:
      return (*modules, name)
  return (*modules, "kernel")


def flax_path_to_key(path: tuple[str, ...]) -> str:
  """The PyTorch key of a Flax parameter path (inverse of :func:`key_to_flax_path` for current names)."""
  parts: list[str] = []
  for seg in path[:-1]:
    m = _NUMBERED.match(seg)
    parts.extend([m.group(1), m.group(2)] if m and seg not in _UNNUMBERED else [seg])
  parts.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(parts)


def _to_flax(arr: np.ndarray, leaf: str, want_ndim: int) -> np.ndarray:
  if leaf != "kernel":
    return arr
  if arr.ndim == 4 and want_ndim == 2 and arr.shape[2:] == (1, 1):
    arr = arr[:, :, 0, 0]
  if arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  return arr.T if arr.ndim == 2 else arr


def _to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return arr
  if arr.ndim == 4:
    return np.transpose(arr, (3, 2, 0, 1))
  return arr.T if arr.ndim == 2 else arr


def _shapes(template: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = traverse_util.flatten_dict(template)
  return {tuple(map(str, k)): tuple(v.shape) for k, v in flat.items()}


def to_params(
  state_dict: Mapping[str, np.ndarray],
  *,
  template: Any,
  what: str,
  ignore: Iterable[str] = (),
) -> dict:
  """Converts a PyTorch-layout state dict to a parameter tree shaped exactly like ``template``.

  Args:
      state_dict: ``{key: array}`` (NumPy; any float dtype, returned as float32).
      template: The target tree (arrays or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``).
      what: What is being loaded, for messages (e.g. ``"unet/diffusion_pytorch_model.safetensors"``).
      ignore: Regular expressions of keys to skip (buffers such as ``position_ids``).

  Returns:
      Nested ``dict`` of float32 NumPy arrays, usable as ``{"params": tree}``.

  Raises:
      ValueError: Listing every missing, unexpected and mis-shaped tensor, each by its PyTorch key and
          Flax path, with the shapes in both layouts.
  """
  want = _shapes(template)
  patterns = [re.compile(p) for p in ignore]
  flat: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  problems: list[str] = []
  for key, value in state_dict.items():
    if any(p.fullmatch(key) for p in patterns):
      continue
    try:
      path = key_to_flax_path(key, want)
    except ValueError as err:
      problems.append(f"unexpected tensor {key!r}: {err}")
      continue
    if path not in want:
      problems.append(f"unexpected tensor {key!r} (the model has no parameter {'/'.join(path)})")
      continue
    if path in source:
      problems.append(f"tensors {source[path]!r} and {key!r} both map to {'/'.join(path)}")
      continue
    source[path] = key
    arr = np.asarray(value)
    converted = _to_flax(arr, path[-1], len(want[path]))
    if converted.shape != want[path]:
      expected = _to_torch(np.empty(want[path], np.float32), path[-1]).shape
      problems.append(
        f"shape mismatch for parameter {key!r}: the file has {tuple(arr.shape)}, the model expects "
        f"{tuple(expected)} (diffjax {'/'.join(path)} {want[path]}); does config.json match the weights?"
      )
      continue
    flat[path] = np.ascontiguousarray(converted, dtype=np.float32)
  for path in sorted(set(want) - set(source)):
    problems.append(f"missing tensor {flax_path_to_key(path)!r} (diffjax {'/'.join(path)} {want[path]})")
  if problems:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(shown) + more)
  return traverse_util.unflatten_dict(flat)


def to_state_dict(params: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
  """Exports a parameter tree under PyTorch keys and layouts (conv OIHW, linear ``[out, in]``).

  Args:
      params: A diffjax parameter tree (``variables["params"]``).
      prefix: Prepended to every key.

  Returns:
      ``{key: contiguous float32 NumPy array}``, ready for ``safetensors.numpy.save_file``.
  """
  out: dict[str, np.ndarray] = {}
  for path, leaf in traverse_util.flatten_dict(jax.device_get(params)).items():
    path = tuple(map(str, path))
    arr = np.asarray(leaf, dtype=np.float32)
    out[prefix + flax_path_to_key(path)] = np.ascontiguousarray(_to_torch(arr, path[-1]))
  return out
