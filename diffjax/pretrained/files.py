"""Files of a diffusers model directory: ``config.json`` and safetensors weights, read and written without torch.

A diffusers pipeline directory holds ``model_index.json`` and one folder per component; a model folder
holds ``config.json`` and its weights as ``diffusion_pytorch_model.safetensors`` (diffusers) or
``model.safetensors`` (transformers), possibly with a variant (``diffusion_pytorch_model.fp16.safetensors``)
or sharded (``*.safetensors.index.json`` + shards). Weights are read only from safetensors, with
``safetensors.numpy`` (bfloat16 tensors, which NumPy lacks, from the documented header and byte layout
via ``ml_dtypes``): a folder with only PyTorch pickles (``.bin``, ``.ckpt``, ``.pt``) is refused, never
unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = [
  "DIFFUSERS_WEIGHTS",
  "TRANSFORMERS_WEIGHTS",
  "read_json",
  "read_safetensors",
  "weights_files",
  "write_json",
  "write_model",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
_PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def read_json(path: str | os.PathLike, *, what: str | None = None) -> dict[str, Any]:
  """Reads a JSON object.

  Args:
      path: The file.
      what: Description for messages (default: the path).

  Returns:
      The parsed object.

  Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: If it is not a JSON object.
  """
  path = Path(path)
  what = what or str(path)
  if not path.is_file():
    raise FileNotFoundError(f"{what}: '{path}' does not exist")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{what}: '{path}' is not valid JSON ({err})") from err
  if not isinstance(data, dict):
    raise ValueError(f"{what}: '{path}' must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004
  return data


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
  """Writes ``data`` as indented, key-sorted JSON (as diffusers does)."""
  Path(path).write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weights_files(directory: str | os.PathLike, *, stem: str, variant: str | None = None) -> list[Path]:
  """The safetensors file(s) of a model folder.

  Args:
      directory: The model folder (e.g. ``pipeline/unet``).
      stem: :data:`DIFFUSERS_WEIGHTS` or :data:`TRANSFORMERS_WEIGHTS`.
      variant: e.g. ``"fp16"`` for ``{stem}.fp16.safetensors``; ``None`` for the plain name.

  Returns:
      One file, or the shards listed by ``{stem}[.variant].safetensors.index.json`` in order.

  Raises:
      FileNotFoundError: If the folder or the weights are missing (listing what it holds).
      ValueError: If the folder holds only pickled PyTorch weights, or the shard index is malformed.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"model folder '{directory}' does not exist")
  name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
  if (directory / name).is_file():
    return [directory / name]
  index = directory / f"{name}.index.json"
  if index.is_file():
    weight_map = read_json(index, what="shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"shard index '{index}' has no weight_map")
    shards = [directory / s for s in dict.fromkeys(weight_map.values())]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
      raise FileNotFoundError(f"shard index '{index}' lists missing files: {missing}")
    return shards
  present = sorted(p.name for p in directory.iterdir())
  pickles = [p for p in present if p.endswith(_PICKLES)]
  if pickles:
    raise ValueError(
      f"'{directory}' holds only PyTorch pickle weights ({', '.join(pickles)}); diffjax reads safetensors "
      f"only and never unpickles. Convert once where torch is installed, e.g. "
      f"`Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`, to get {name}"
    )
  raise FileNotFoundError(f"'{directory}' has no {name} (nor {name}.index.json); it holds {present}")


def _read_bfloat16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
  """bfloat16 tensors from the safetensors layout: u64 header size, JSON header, raw little-endian bytes."""
  with path.open("rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    out = {}
    for name in names:
      info = header[name]
      begin, end = info["data_offsets"]
      f.seek(8 + size + begin)
      raw = f.read(end - begin)
      out[name] = np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])
  return out


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
  """Reads every tensor of one or more safetensors files as float32 NumPy arrays.

  Args:
      files: From :func:`weights_files`.

  Returns:
      ``{name: float32 array}``.

  Raises:
      ValueError: If a file is not valid safetensors or a name repeats across shards.
  """
  out: dict[str, np.ndarray] = {}
  for path in files:
    bf16: list[str] = []
    try:
      with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
          if name in out:
            raise ValueError(f"tensor {name!r} appears in more than one shard (again in '{path}')")
          try:
            out[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
          except TypeError:  # NumPy has no bfloat16
            bf16.append(name)
    except SafetensorError as err:
      raise ValueError(f"'{path}' is not a readable safetensors file: {err}") from err
    if bf16:
      out.update({k: v.astype(np.float32) for k, v in _read_bfloat16(path, bf16).items()})
  return out


def write_model(
  directory: str | os.PathLike, *, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], stem: str
) -> Path:
  """Writes ``config.json`` and ``{stem}.safetensors`` into ``directory`` (created if needed).

  Args:
      directory: The model folder.
      config: The config dict.
      tensors: ``{key: array}`` in PyTorch layouts.
      stem: :data:`DIFFUSERS_WEIGHTS` or :data:`TRANSFORMERS_WEIGHTS`.

  Returns:
      The weights file.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_json(directory / "config.json", config)
  path = directory / f"{stem}.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
  return path
