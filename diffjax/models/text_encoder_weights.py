"""Reading BERT weights from a safetensors file into a :class:`~diffjax.models.text_encoder.TextTransformer`.

Hugging Face ``BertModel`` checkpoints name their tensors ``embeddings.word_embeddings.weight``,
``encoder.layer.{i}.attention.self.query.weight``, ... (``transformers/models/bert/modeling_bert.py``),
possibly under a prefix such as ``bert.`` (task heads) or ``0.auto_model.`` (sentence-transformers).
:func:`bert_name` maps each Flax parameter path to its BERT name; :func:`load_bert_params` reads exactly
those tensors with ``safetensors`` (numpy, no torch, no pickle), transposes the ``nn.Linear`` weights
(``[out, in]``) to Flax kernels (``[in, out]``) and checks every shape against the module, so a missing
or mis-shaped tensor is reported by name. Tensors the module does not use (``pooler.*``,
``embeddings.position_ids``) are ignored.
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

__all__ = ["bert_name", "load_bert_params"]

_ANCHOR = "embeddings.word_embeddings.weight"

# Flax module name -> BERT module name; ``{i}`` is the layer index.
_MODULES = {
  "word_embeddings": "embeddings.word_embeddings",
  "position_embeddings": "embeddings.position_embeddings",
  "token_type_embeddings": "embeddings.token_type_embeddings",
  "embeddings_layer_norm": "embeddings.LayerNorm",
  "query": "encoder.layer.{i}.attention.self.query",
  "key": "encoder.layer.{i}.attention.self.key",
  "value": "encoder.layer.{i}.attention.self.value",
  "attention_output": "encoder.layer.{i}.attention.output.dense",
  "attention_layer_norm": "encoder.layer.{i}.attention.output.LayerNorm",
  "intermediate": "encoder.layer.{i}.intermediate.dense",
  "output": "encoder.layer.{i}.output.dense",
  "output_layer_norm": "encoder.layer.{i}.output.LayerNorm",
}
# Flax leaf -> (BERT leaf, transpose).
_LEAVES = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False)}
_LAYER = re.compile(r"layer_(\d+)")


def bert_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """The BERT tensor name of a Flax parameter of :class:`~diffjax.models.text_encoder.TextTransformer`.

  Args:
      path: Flax parameter path, e.g. ``("layer_0", "query", "kernel")`` or
          ``("word_embeddings", "embedding")``.

  Returns:
      ``(name, transpose)``, e.g. ``("encoder.layer.0.attention.self.query.weight", True)``; ``transpose``
      says the BERT tensor is a ``[out, in]`` ``nn.Linear`` weight.

  Raises:
      ValueError: If ``path`` is not a parameter of the module.
  """
  *modules, leaf = path
  layer = None
  if modules and (m := _LAYER.fullmatch(modules[0])):
    layer, modules = int(m.group(1)), modules[1:]
  if (
    len(modules) != 1 or modules[0] not in _MODULES or ("{i}" in _MODULES[modules[0]]) != (layer is not None)
  ):
    raise ValueError(f"no BERT name for Flax parameter {'/'.join(path)!r}")
  if leaf == "embedding":
    bert_leaf, transpose = "weight", False
  elif leaf in _LEAVES:
    bert_leaf, transpose = _LEAVES[leaf]
  else:
    raise ValueError(f"no BERT name for Flax parameter {'/'.join(path)!r}")
  return f"{_MODULES[modules[0]].format(i=layer)}.{bert_leaf}", transpose


def _find_prefix(names: set[str], path: str) -> str:
  prefixes = sorted(n[: -len(_ANCHOR)] for n in names if n.endswith(_ANCHOR))
  prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
  if not prefixes:
    some = ", ".join(sorted(names)[:5])
    raise ValueError(f"'{path}' holds no BERT weights: no tensor named '{_ANCHOR}' (first names: {some})")
  if len(prefixes) > 1:
    raise ValueError(f"'{path}' holds several BERT models (prefixes {prefixes}); pass prefix=...")
  return prefixes[0]


def load_bert_params(
  path: str | os.PathLike, *, module: nn.Module, prefix: str | None = None
) -> dict[str, Any]:
  """Reads BERT weights for ``module`` from a safetensors file.

  Args:
      path: A ``.safetensors`` file with Hugging Face ``BertModel`` tensor names.
      module: The :class:`~diffjax.models.text_encoder.TextTransformer` the weights are for; its
          configuration fixes the expected names and shapes.
      prefix: Prefix of every tensor name (e.g. ``"bert."``); ``None`` finds it from the name of the
          word embeddings.

  Returns:
      The parameter tree of ``module`` (nested dicts of float32 numpy arrays), to use as
      ``module.apply({"params": params}, input_ids, attention_mask)``.

  Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: If the file is not a safetensors file, or a tensor the module needs is missing or has
          the wrong shape (the message names the tensor, the Flax parameter and both shapes).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file '{path}' does not exist")
  ids = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"]
  expected = traverse_util.flatten_dict(abstract)
  flat = {}
  try:
    with safe_open(path, framework="numpy") as f:
      names = set(f.keys())
      if prefix is None:
        prefix = _find_prefix(names, path)
      for flax_path, spec in expected.items():
        name, transpose = bert_name(flax_path)
        name = prefix + name
        where = f"tensor '{name}' (Flax parameter {'/'.join(flax_path)}) in '{path}'"
        if name not in names:
          raise ValueError(f"missing {where}")
        tensor = f.get_tensor(name)
        if transpose and tensor.ndim == 2:
          tensor = tensor.T
        if tensor.shape != spec.shape:
          shape = tuple(reversed(tensor.shape)) if transpose else tensor.shape
          want = tuple(reversed(spec.shape)) if transpose else spec.shape
          raise ValueError(f"{where} has shape {shape}, expected {want} for this module")
        flat[flax_path] = np.ascontiguousarray(tensor, dtype=np.float32)
  except SafetensorError as err:
    raise ValueError(f"could not read safetensors file '{path}': {err}") from err
  return traverse_util.unflatten_dict(flat)
