"""Loading ``configs/<name>.py[:variant]`` files and applying ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``; ``arg`` is the text after
the colon (big_vision's convention). Sibling modules of the config file are importable from it.

Override values are parsed against the current value's type: booleans accept true/false/1/0/yes/no,
numbers and tuples are Python literals, ``none``/``null`` clears a non-string field; a string field takes
the text verbatim (``--config.diffusion.weighting=none`` is the string "none"), and only ``None`` clears it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:variant`` and returns ``get_config(variant)``."""
  path, _, variant = spec.partition(":")
  if not path.endswith(".py"):
    raise ValueError(f"--config must name a .py file (optionally ':variant'), got {spec!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config file {path!r} does not exist")
  directory = os.path.dirname(os.path.abspath(path))
  name = "_diffjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, directory)
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.path.remove(directory)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config file {path!r} defines no get_config()")
  config = module.get_config(variant or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"get_config() in {path!r} must return an ml_collections.ConfigDict")
  return config


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(current, str):
    # A string field takes the text verbatim ("none" is a valid value, e.g. diffusion.weighting);
    # only Python's spelling ``None`` clears it.
    return None if text == "None" else text
  if text.lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  if isinstance(current, tuple) and not isinstance(value, (tuple, list)):
    return (value,)
  if current is not None and not isinstance(value, type(current)):
    raise ValueError(f"expected a value of type {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, str]
) -> ml_collections.ConfigDict:
  """Sets ``config.a.b = value`` for each ``{"a.b": "value"}``; unknown keys are errors."""
  for dotted, text in overrides.items():
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        raise ValueError(
          f"unknown config key 'config.{dotted}' ({'.'.join(parts[:i]) or 'config'} has: {known})"
        )
      if i < len(parts) - 1:
        node = node[part]
    leaf = parts[-1]
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(
        f"config.{dotted} is a group; set one of its keys: {', '.join(sorted(node[leaf].keys()))}"
      )
    try:
      value = _parse_value(text, node[leaf])
    except ValueError as e:
      raise ValueError(f"bad value for config.{dotted}: {e}") from None
    with node.ignore_type():
      node[leaf] = value
  return config
