"""Saving and loading judges as one safetensors file (no pickle).

The parameter tree is flattened to ``'/'``-joined keys (``conv1/kernel``, ``head/bias``, ...) and stored
as float32 tensors; the judge's ``info`` dict (training data fingerprint, image shape, classes, held-out
accuracy, settings) is stored as JSON in the safetensors header metadata under ``diffjax_judge_info``,
so a judge file is self-describing and can be checked against the data it is meant to judge.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from diffjax.eval.judge import JUDGE_FORMAT

__all__ = ["load_judge", "save_judge"]

_INFO_KEY = "diffjax_judge_info"
_REQUIRED_INFO = ("format", "data_fingerprint", "image_shape", "num_classes")


def save_judge(path: str | os.PathLike, params: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes ``params`` and ``info`` to ``path`` (a ``.safetensors`` file), atomically.

  Args:
      path: Destination file; parent directories are created.
      params: Judge parameter tree (nested dicts of arrays).
      info: JSON-serialisable dict from :func:`diffjax.eval.train_judge`.

  Raises:
      ValueError: If ``info`` lacks required keys or is not JSON-serialisable.
  """
  missing = [k for k in _REQUIRED_INFO if k not in info]
  if missing:
    raise ValueError(f"info is missing required keys {missing}")
  try:
    meta = json.dumps(info, sort_keys=True)
  except TypeError as err:
    raise ValueError(f"info must be JSON-serialisable: {err}") from err
  flat = traverse_util.flatten_dict(params, sep="/")
  tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  save_file(tensors, tmp, metadata={_INFO_KEY: meta})
  os.replace(tmp, path)


def load_judge(
  path: str | os.PathLike, *, expected_fingerprint: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a judge written by :func:`save_judge`.

  Args:
      path: The ``.safetensors`` judge file.
      expected_fingerprint: If given, the :meth:`ImageDataset.fingerprint` of the data the judge must
          have been trained on; a judge trained on other data is refused.

  Returns:
      ``(params, info)``: nested dict of float32 numpy arrays, and the info dict.

  Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: If the file is not a judge file, or its data fingerprint differs from
          ``expected_fingerprint``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"judge file '{path}' does not exist")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      names = f.keys()
      flat = {k: f.get_tensor(k) for k in names}
  except (SafetensorError, OSError, ValueError) as err:
    raise ValueError(f"judge file '{path}' is not a readable safetensors file: {err}") from err
  if _INFO_KEY not in meta:
    raise ValueError(f"judge file '{path}' has no '{_INFO_KEY}' metadata; was it written by save_judge?")
  try:
    info = json.loads(meta[_INFO_KEY])
  except json.JSONDecodeError as err:
    raise ValueError(f"judge file '{path}' has malformed info metadata: {err}") from err
  if not isinstance(info, dict) or info.get("format") != JUDGE_FORMAT:
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    raise ValueError(f"judge file '{path}' has format {found!r}, expected {JUDGE_FORMAT!r}")
  if expected_fingerprint is not None and info.get("data_fingerprint") != expected_fingerprint:
    raise ValueError(
      f"judge '{path}' was trained on data {info.get('data_name')!r} with fingerprint "
      f"{info.get('data_fingerprint')}, expected fingerprint {expected_fingerprint}"
    )
  params = traverse_util.unflatten_dict(flat, sep="/")
  return params, info
