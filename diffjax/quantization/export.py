"""Real integer weights: export a calibrated fake-quant model as int8 / packed-int4 safetensors, and back.

A file holds, for every quantized kernel ``<path>/kernel``, its integers ``<path>/kernel.q`` (``int8``
for 5-8 bits, two signed nibbles per ``uint8`` for 2-4 bits, ``int16`` for 9-16 bits) and its scales
``<path>/kernel.scale`` (``float32 [G, C_out]``); every other parameter as float32 under its path; the
``"quant"`` collection (activation scales, timestep table) under ``quant/<path>``; and, as JSON in the
safetensors header under ``diffjax_quant``, the :class:`~diffjax.quantization.QuantConfig` and each
kernel's bits, shape, storage and split. :func:`load_quantized` rebuilds parameters whose kernels are
exactly ``q * scale``, which the fake-quant model maps to themselves, so a loaded model computes
bit-for-bit what the exported one did.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from diffjax.quantization.fake_quant import QuantConfig
from diffjax.quantization.quantizers import int_range, pack_int4, quantize_to_int, unpack_int4

__all__ = ["FORMAT", "load_quantized", "quantized_kernels", "save_quantized", "weight_bytes"]

FORMAT = "diffjax-quant-1"
_META_KEY = "diffjax_quant"


def _storage(bits: int) -> str:
  return "int4" if bits <= 4 else ("int8" if bits <= 8 else "int16")


def quantized_kernels(params: Any, quant: Any, config: QuantConfig) -> dict[tuple, dict]:
  """The integer form of every quantized kernel.

  Returns:
    ``{kernel path: {"q": int32 array shaped like the kernel, "scale": float32 [G, C_out],
    "bits": int, "split": int or None}}``.
  """
  flat_p = traverse_util.flatten_dict(params)
  flat_q = traverse_util.flatten_dict(quant)
  out = {}
  for key, w_scale in flat_q.items():
    if key[-1] != "w_scale":
      continue
    layer = key[:-1]
    kernel = np.asarray(flat_p[layer + ("kernel",)], np.float32)
    bits = config.weight_bits(layer, "conv" if kernel.ndim >= 3 else "dense")
    if bits is None:
      continue
    _, q_max = int_range(bits, symmetric=True)
    w_scale = np.asarray(w_scale, np.float32)
    split = None
    if w_scale.shape[0] == 1:
      q = quantize_to_int(kernel, scale=w_scale[0], zero_point=0, q_min=-q_max, q_max=q_max)
    else:
      split = int(flat_q[layer + ("w_split",)])
      first = (np.arange(kernel.shape[-2]) < split)[:, None]
      q = jnp.where(
        first,
        quantize_to_int(kernel, scale=w_scale[0], zero_point=0, q_min=-q_max, q_max=q_max),
        quantize_to_int(kernel, scale=w_scale[1], zero_point=0, q_min=-q_max, q_max=q_max),
      )
    out[layer + ("kernel",)] = {"q": np.asarray(q), "scale": w_scale, "bits": bits, "split": split}
  return out


def weight_bytes(params: Any, quant: Any, config: QuantConfig) -> dict[str, int]:
  """Bytes of the weights as stored by :func:`save_quantized` (tensor data only, no header).

  Returns:
    ``{"quantized_kernels": integer kernels + their float32 scales, "float": other parameters in
    float32, "total": their sum, "float32_total": every parameter in float32, "activation_scales":
    the "quant" collection's activation tables}``.
  """
  kernels = quantized_kernels(params, quant, config)
  qbytes = 0
  for info in kernels.values():
    n = info["q"].size
    per = {"int4": (n + 1) // 2, "int8": n, "int16": 2 * n}[_storage(info["bits"])]
    qbytes += per + 4 * info["scale"].size
  flat_p = traverse_util.flatten_dict(params)
  fbytes = sum(4 * int(np.size(v)) for k, v in flat_p.items() if k not in kernels)
  act = sum(
    int(np.asarray(v).nbytes)
    for k, v in traverse_util.flatten_dict(quant).items()
    if k[-1] not in ("w_scale", "w_split")
  )
  return {
    "quantized_kernels": int(qbytes),
    "float": int(fbytes),
    "total": int(qbytes + fbytes),
    "float32_total": int(sum(4 * int(np.size(v)) for v in flat_p.values())),
    "activation_scales": act,
  }


def save_quantized(path: str | os.PathLike, params: Any, quant: Any, config: QuantConfig) -> dict[str, int]:
  """Writes integer kernels, scales, the other parameters and the ``"quant"`` collection to ``path``.

  Args:
    path: destination ``.safetensors`` file (written atomically; parent directories are created).
    params: full-precision parameters (the kernels are quantized here with ``quant``'s weight scales).
    quant: the calibrated ``"quant"`` collection.
    config: the config the collection was calibrated for.

  Returns:
    :func:`weight_bytes` of what was written, plus ``"file"``: the file's size in bytes.
  """
  kernels = quantized_kernels(params, quant, config)
  tensors: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {"format": FORMAT, "config": config.to_json(), "kernels": {}}
  for key, info in kernels.items():
    name = "/".join(key)
    storage = _storage(info["bits"])
    q = info["q"]
    if storage == "int4":
      data = pack_int4(q)
    else:
      data = q.astype(np.int8 if storage == "int8" else np.int16)
    tensors[f"{name}.q"] = np.ascontiguousarray(data)
    tensors[f"{name}.scale"] = np.ascontiguousarray(info["scale"])
    meta["kernels"][name] = {
      "bits": info["bits"],
      "shape": list(q.shape),
      "storage": storage,
      "split": info["split"],
    }
  for key, value in traverse_util.flatten_dict(params).items():
    if key not in kernels:
      tensors["/".join(key)] = np.ascontiguousarray(np.asarray(value, np.float32))
  for key, value in traverse_util.flatten_dict(quant).items():
    value = np.asarray(value)
    tensors["quant/" + "/".join(key)] = np.ascontiguousarray(
      value.astype(np.int32 if value.dtype.kind in "iu" else np.float32)
    )
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
  os.replace(tmp, path)
  sizes = weight_bytes(params, quant, config)
  sizes["file"] = os.path.getsize(path)
  return sizes


def load_quantized(path: str | os.PathLike) -> tuple[dict, dict, QuantConfig]:
  """Reads a file written by :func:`save_quantized`.

  Returns:
    ``(params, quant, config)``: parameters whose quantized kernels are ``q * scale`` (float32),
    the ``"quant"`` collection and the config; ``{"params": params, "quant": quant}`` runs in a
    :class:`~diffjax.quantization.QuantizedModel` built with ``config``.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if it is not a quantized-model file of this format.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"quantized model file '{path}' does not exist")
  try:
    with safe_open(path, framework="numpy") as f:
      header = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
  except (SafetensorError, OSError, ValueError) as err:
    raise ValueError(f"'{path}' is not a readable safetensors file: {err}") from err
  try:
    meta = json.loads(header[_META_KEY])
  except (KeyError, json.JSONDecodeError) as err:
    raise ValueError(
      f"'{path}' has no valid '{_META_KEY}' metadata; was it written by save_quantized?"
    ) from err
  if meta.get("format") != FORMAT:
    raise ValueError(f"'{path}' has format {meta.get('format')!r}, expected {FORMAT!r}")
  config = QuantConfig.from_json(meta["config"])
  params: dict[tuple, np.ndarray] = {}
  quant: dict[tuple, np.ndarray] = {}
  for name, value in tensors.items():
    if name.endswith((".q", ".scale")):
      continue
    if name.startswith("quant/"):
      quant[tuple(name[len("quant/") :].split("/"))] = value
    else:
      params[tuple(name.split("/"))] = value
  for name, info in meta["kernels"].items():
    shape = tuple(info["shape"])
    raw = tensors[f"{name}.q"]
    if info["storage"] == "int4":
      q = unpack_int4(raw, int(np.prod(shape))).reshape(shape)
    else:
      q = raw.reshape(shape)
    q = q.astype(np.float32)
    scale = tensors[f"{name}.scale"].astype(np.float32)
    if info["split"] is None:
      kernel = q * scale[0]
    else:
      first = (np.arange(shape[-2]) < info["split"])[:, None]
      kernel = np.where(first, q * scale[0], q * scale[1])
    params[tuple(name.split("/"))] = kernel.astype(np.float32)
  return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(quant), config
