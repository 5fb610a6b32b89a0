"""Tests for diffjax.models.text_encoder_weights: BERT names and the safetensors loader's checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from diffjax.models.text_encoder import TextTransformer
from diffjax.models.text_encoder_weights import bert_name, load_bert_params

TINY = TextTransformer(
  vocab_size=40, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, max_position_embeddings=10
)


_APPLY = jax.jit(TINY.apply)


def _bert_tensors(module: TextTransformer, *, prefix: str = "") -> tuple[dict, dict[str, np.ndarray]]:
  """Random params for ``module`` and the same weights under BERT names (Linear weights ``[out, in]``)."""
  ids = jnp.zeros((1, 3), jnp.int32)
  shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"])
  rng = np.random.default_rng(0)
  flat, tensors = {}, {}
  for path, spec in shapes.items():
    value = rng.normal(size=spec.shape).astype(np.float32)
    name, transpose = bert_name(path)
    flat[path] = value
    tensors[prefix + name] = np.ascontiguousarray(value.T if transpose else value)
  tensors[prefix + "pooler.dense.weight"] = np.zeros((8, 8), np.float32)  # unused, ignored
  return traverse_util.unflatten_dict(flat), tensors


def test_bert_names():
  assert bert_name(("layer_3", "query", "kernel")) == ("encoder.layer.3.attention.self.query.weight", True)
  assert bert_name(("layer_0", "attention_layer_norm", "scale")) == (
    "encoder.layer.0.attention.output.LayerNorm.weight",
    False,
  )
  assert bert_name(("layer_1", "output", "bias")) == ("encoder.layer.1.output.dense.bias", False)
  assert bert_name(("word_embeddings", "embedding")) == ("embeddings.word_embeddings.weight", False)
  assert bert_name(("embeddings_layer_norm", "bias")) == ("embeddings.LayerNorm.bias", False)
  for bad in [("query", "kernel"), ("layer_0", "word_embeddings", "embedding"), ("layer_0", "query", "w")]:
    with pytest.raises(ValueError, match="no BERT name"):
      bert_name(bad)


@pytest.mark.parametrize("prefix", ["", "bert.", "0.auto_model."])
def test_round_trip_with_any_prefix(tmp_path, prefix):
  params, tensors = _bert_tensors(TINY, prefix=prefix)
  path = tmp_path / "w.safetensors"
  save_file(tensors, str(path))
  loaded = load_bert_params(path, module=TINY)
  ids = jnp.array([[1, 5, 7, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 0]], jnp.int32)
  want = _APPLY({"params": params}, ids, mask)
  got = _APPLY({"params": loaded}, ids, mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  _, tensors = _bert_tensors(TINY, prefix="bert.")
  path = tmp_path / "w.safetensors"
  missing = dict(tensors)
  del missing["bert.encoder.layer.1.intermediate.dense.weight"]
  save_file(missing, str(path))
  with pytest.raises(
    ValueError,
    match=r"missing tensor 'bert.encoder.layer.1.intermediate.dense.weight' \(Flax parameter "
    r"layer_1/intermediate/kernel\)",
  ):
    load_bert_params(path, module=TINY)

  wrong = dict(tensors)
  wrong["bert.encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 6), np.float32)
  save_file(wrong, str(path))
  with pytest.raises(
    ValueError, match=r"attention.self.key.weight' .* has shape \(8, 6\), expected \(8, 8\)"
  ):
    load_bert_params(path, module=TINY)

  save_file({"foo.weight": np.zeros(3, np.float32)}, str(path))
  with pytest.raises(ValueError, match="holds no BERT weights"):
    load_bert_params(path, module=TINY)
  both = {**_bert_tensors(TINY, prefix="a.")[1], **_bert_tensors(TINY, prefix="b.")[1]}
  save_file(both, str(path))
  with pytest.raises(ValueError, match="several BERT models"):
    load_bert_params(path, module=TINY)
  assert load_bert_params(path, module=TINY, prefix="b.")["layer_1"]["query"]["kernel"].shape == (8, 8)

  path.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="could not read safetensors file"):
    load_bert_params(path, module=TINY)
  with pytest.raises(FileNotFoundError):
    load_bert_params(tmp_path / "nope.safetensors", module=TINY)
