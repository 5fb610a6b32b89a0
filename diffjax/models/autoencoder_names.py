"""diffusers ``AutoencoderKL`` state dicts <-> the parameter tree of :class:`diffjax.models.AutoencoderKL`.

The naming rules are those of :mod:`diffjax.models.diffusers_names` (numeric segments joined with
``_``, ``weight`` -> ``kernel`` / ``scale``, OIHW -> HWIO, linear ``[out, in]`` -> ``[in, out]``):
``encoder.down_blocks.0.resnets.1.conv1.weight`` <-> ``encoder/down_blocks_0/resnets_1/conv1/kernel``.
Imports also accept the legacy attention names of older diffusers VAE checkpoints (``query``, ``key``,
``value``, ``proj_attn``) and attention projections stored as 1x1 convs ``[C, C, 1, 1]``. Exports
always write the current names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so
``autoencoder_params_to_diffusers(diffusers_to_autoencoder_params(sd, template=t)) == sd`` exactly for
a current-format state dict, and the reverse round trip is exact too.

No torch import: pass NumPy arrays (torch tensors are converted with ``.detach().cpu().numpy()``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from diffjax.models.diffusers_names import diffusers_key_to_path

__all__ = [
  "autoencoder_kwargs_from_diffusers_config",
  "autoencoder_params_to_diffusers",
  "diffusers_to_autoencoder_params",
  "flax_path_to_diffusers_key",
]

_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def flax_path_to_diffusers_key(path: tuple[str, ...]) -> str:
  """diffusers key for a Flax parameter path.

  Args:
      path: e.g. ``("encoder", "mid_block", "attentions_0", "to_out_0", "kernel")``.

  Returns:
      e.g. ``"encoder.mid_block.attentions.0.to_out.0.weight"``.
  """
  parts: list[str] = []
  for seg in path[:-1]:
    m = _NUMBERED.match(seg)
    parts.extend([m.group(1), m.group(2)] if m else [seg])
  parts.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(parts)


def _to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return arr
  if arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))
  return arr.T


def _to_diffusers(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return arr
  if arr.ndim == 4:
    return np.transpose(arr, (3, 2, 0, 1))
  return arr.T


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(getattr(k, "key", k)) for k in p): tuple(leaf.shape) for p, leaf in leaves}


def diffusers_to_autoencoder_params(state_dict: Mapping[str, Any], *, template: Any) -> dict:
  """Converts a diffusers ``AutoencoderKL`` state dict into a diffjax params tree.

  Args:
      state_dict: ``{key: array}`` from ``AutoencoderKL.state_dict()`` (NumPy arrays or torch tensors).
      template: The target params tree (arrays or ``jax.ShapeDtypeStruct``, e.g.
          ``jax.eval_shape(vae.init, key, x)["params"]``); every leaf must be filled with the same shape.

  Returns:
      Nested ``dict`` of float32 NumPy arrays, usable as ``{"params": tree}``.

  Raises:
      ValueError: Listing every diffusers key the model lacks, every model parameter with no diffusers
          key, every shape mismatch (both names and both layouts), and keys that collide.
  """
  want = _flat_shapes(template)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  source: dict[tuple[str, ...], str] = {}
  problems: list[str] = []
  seen: set[tuple[str, ...]] = set()  # Paths some key mapped to (mis-shaped ones are not "missing").
  for key, value in state_dict.items():
    arr = _as_numpy(value)
    try:
      path = diffusers_key_to_path(key, arr.ndim)
    except ValueError as err:
      problems.append(f"unexpected diffusers key {key!r}: {err}")
      continue
    if path not in want:
      problems.append(f"unexpected diffusers key {key!r} (no diffjax parameter {'/'.join(path)})")
      continue
    seen.add(path)
    if path in flat:
      problems.append(f"diffusers keys {source[path]!r} and {key!r} both map to {'/'.join(path)}")
      continue
    if len(want[path]) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
      arr = arr[:, :, 0, 0]  # Attention projection stored as a 1x1 conv.
    if path[-1] == "kernel" and arr.ndim not in (2, 4):
      problems.append(f"diffusers key {key!r} has rank {arr.ndim}; expected a 2-D or 4-D weight")
      continue
    converted = _to_flax(arr, path[-1])
    if converted.shape != want[path]:
      expected = _to_diffusers(np.empty(want[path], np.float32), path[-1]).shape
      problems.append(
        f"shape mismatch for diffusers key {key!r}: got {tuple(arr.shape)}, the model expects "
        f"{tuple(expected)} (diffjax {'/'.join(path)} {want[path]})"
      )
      continue
    flat[path] = np.ascontiguousarray(converted)
    source[path] = key
  for path in sorted(set(want) - set(flat) - seen):
    problems.append(
      f"missing diffusers key {flax_path_to_diffusers_key(path)!r} (diffjax {'/'.join(path)} {want[path]})"
    )
  if problems:
    raise ValueError(
      "diffusers AutoencoderKL state dict does not match the model:\n  " + "\n  ".join(problems)
    )
  return traverse_util.unflatten_dict(flat)


def autoencoder_params_to_diffusers(params: Any) -> dict[str, np.ndarray]:
  """Exports a diffjax params tree as a diffusers ``AutoencoderKL`` state dict (current names).

  Args:
      params: The ``"params"`` tree of :class:`~diffjax.models.AutoencoderKL`.

  Returns:
      ``{diffusers key: float32 NumPy array}`` in PyTorch layouts (conv OIHW, linear ``[out, in]``),
      loadable with ``AutoencoderKL.load_state_dict`` after ``torch.from_numpy``.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  out: dict[str, np.ndarray] = {}
  for p, leaf in leaves:
    path = tuple(str(getattr(k, "key", k)) for k in p)
    arr = np.asarray(jax.device_get(leaf), dtype=np.float32)
    out[flax_path_to_diffusers_key(path)] = np.ascontiguousarray(_to_diffusers(arr, path[-1]))
  return out


_SUPPORTED = {
  "down_block_types": "DownEncoderBlock2D",
  "up_block_types": "UpDecoderBlock2D",
}


def autoencoder_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments of :class:`~diffjax.models.AutoencoderKL` from a diffusers ``config.json`` dict.

  Args:
      config: The ``AutoencoderKL`` config (e.g. ``json.load`` of a checkpoint's ``vae/config.json``).

  Returns:
      ``{in_channels, out_channels, block_out_channels, layers_per_block, latent_channels,
      norm_num_groups, mid_block_add_attention, use_quant_conv, use_post_quant_conv}``. The scaling
      and shift factors are not model arguments: read ``config["scaling_factor"]`` and
      ``config.get("shift_factor")`` for :func:`~diffjax.models.autoencoder.make_codec`.

  Raises:
      ValueError: On block types other than ``DownEncoderBlock2D``/``UpDecoderBlock2D`` or an
          activation other than SiLU.
  """
  boc = tuple(int(c) for c in config.get("block_out_channels", (64,)))
  for field, allowed in _SUPPORTED.items():
    types = tuple(config.get(field, (allowed,) * len(boc)))
    if any(t != allowed for t in types) or len(types) != len(boc):
      raise ValueError(f"{field}={types} is not supported: expected {len(boc)} x {allowed!r}")
  if config.get("act_fn", "silu") != "silu":
    raise ValueError(f"act_fn={config['act_fn']!r} is not supported: only 'silu'")
  return {
    "in_channels": int(config.get("in_channels", 3)),
    "out_channels": int(config.get("out_channels", 3)),
    "block_out_channels": boc,
    "layers_per_block": int(config.get("layers_per_block", 1)),
    "latent_channels": int(config.get("latent_channels", 4)),
    "norm_num_groups": int(config.get("norm_num_groups", 32)),
    "mid_block_add_attention": bool(config.get("mid_block_add_attention", True)),
    "use_quant_conv": bool(config.get("use_quant_conv", True)),
    "use_post_quant_conv": bool(config.get("use_post_quant_conv", True)),
  }
