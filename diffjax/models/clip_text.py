"""The CLIP text encoder in Flax, in the layout of transformers' ``CLIPTextModel``.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
Sec. 2.4) encodes text with a GPT-2-style transformer (Radford et al. 2019): token plus learned position
embeddings, pre-LayerNorm layers of causally masked multi-head self-attention and an MLP, and a final
LayerNorm. Stable Diffusion (Rombach et al. 2022) conditions its U-Net on the per-token last hidden
states of a frozen CLIP ViT-L/14 text encoder (SD 1.x) or OpenCLIP ViT-H/14 (SD 2.x, which uses the
penultimate layer: ``clip_skip=1``); the pooled output is the final hidden state at the end-of-text token.

Parameter tree (transformers' state-dict names with ``.{i}`` joined by ``_``)::

    embeddings/{token_embedding, position_embedding}/embedding
    encoder/layers_{i}/{layer_norm1, self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm2,
                        mlp/{fc1, fc2}}
    final_layer_norm

Weights convert from ``CLIPTextModel`` safetensors (with or without the ``text_model.`` prefix of older
checkpoints) by :mod:`diffjax.pretrained.state_dicts`; :func:`clip_text_kwargs` maps a ``config.json``.
Follows ``transformers/models/clip/modeling_clip.py`` (``CLIPTextTransformer``); no dropout (inference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["CLIP_ACTIVATIONS", "CLIPTextModel", "clip_text_config", "clip_text_kwargs"]


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """``x * sigmoid(1.702 x)``, the GELU approximation of the original CLIP (Hendrycks & Gimpel 2016)."""
  return x * jax.nn.sigmoid(1.702 * x)


CLIP_ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _layer_norm(eps: float, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biased ``q_proj``/``k_proj``/``v_proj``/``out_proj`` (``CLIPAttention``).

  Attributes:
      num_heads: Heads; the width must be divisible by it.
      dtype: Compute dtype (logits and softmax in float32).
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """``x``: ``[B, L, D]``; ``bias``: additive mask ``[B or 1, 1, L, L]``. Returns ``[B, L, D]``."""
    b, length, d = x.shape
    hd = d // self.num_heads

    def proj(name: str) -> jnp.ndarray:
      return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, length, self.num_heads, hd)

    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    logits = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32)) * hd**-0.5
    weights = jax.nn.softmax(logits + bias, axis=-1)
    out = jnp.einsum("bhls,bshd->blhd", weights, v.astype(jnp.float32)).astype(x.dtype)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, length, d))


class CLIPEncoderLayer(nn.Module):
  """``x + attn(LN1(x))`` then ``x + fc2(act(fc1(LN2(x))))`` (``CLIPEncoderLayer``, pre-LN).

  Attributes:
      num_heads: Attention heads.
      intermediate_size: MLP width.
      hidden_act: Activation name, a key of :data:`CLIP_ACTIVATIONS`.
      layer_norm_eps: LayerNorm epsilon.
      dtype: Compute dtype.
  """

  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """``[B, L, D]`` -> ``[B, L, D]``."""
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + CLIPAttention(self.num_heads, self.dtype, name="self_attn")(h, bias)
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
    mlp = _MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")
    return x + mlp(h)


class _MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = CLIP_ACTIVATIONS[self.hidden_act](h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class _Encoder(nn.Module):
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, run_layers: int) -> jnp.ndarray:
    for i in range(run_layers):
      x = CLIPEncoderLayer(
        self.num_heads,
        self.intermediate_size,
        self.hidden_act,
        self.layer_norm_eps,
        self.dtype,
        name=f"layers_{i}",
      )(x, bias)
    return x


class _Embeddings(nn.Module):
  vocab_size: int
  max_position_embeddings: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
    init = nn.initializers.normal(0.02)

    def embed(num: int, name: str) -> nn.Embed:
      return nn.Embed(num, self.hidden_size, embedding_init=init, dtype=self.dtype, name=name)

    tokens = embed(self.vocab_size, "token_embedding")(input_ids)
    return (
      tokens + embed(self.max_position_embeddings, "position_embedding")(jnp.arange(input_ids.shape[1]))[None]
    )


class CLIPTextModel(nn.Module):
  """CLIP's causal text transformer: last hidden states and the pooled end-of-text state.

  Attributes:
      vocab_size: Token ids (49,408 for CLIP's BPE vocabulary).
      hidden_size: Width ``D`` (768 for SD 1.x, 1024 for SD 2.x).
      intermediate_size: MLP width.
      num_hidden_layers: Transformer layers.
      num_attention_heads: Heads; ``hidden_size`` must be divisible by it.
      max_position_embeddings: Longest sequence (77 in Stable Diffusion).
      hidden_act: ``"quick_gelu"`` (OpenAI CLIP), ``"gelu"`` (OpenCLIP, exact erf) or ``"gelu_new"``.
      layer_norm_eps: LayerNorm epsilon.
      eos_token_id: End-of-text id; the pooled output is the state at its first occurrence. The legacy
          value 2 (configs from before transformers fixed it) pools at the largest id instead, as
          transformers does.
      dtype: Compute dtype; parameters stay float32.

  Example:
      >>> import jax, jax.numpy as jnp
      >>> clip = CLIPTextModel(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      ...                      num_attention_heads=4, max_position_embeddings=8, eos_token_id=99)
      >>> ids = jnp.array([[98, 5, 7, 99, 99, 99, 99, 99]])
      >>> params = clip.init(jax.random.key(0), ids)["params"]
      >>> hidden, pooled = clip.apply({"params": params}, ids)
      >>> hidden.shape, pooled.shape
      ((1, 8, 32), (1, 32))
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None, *, clip_skip: int = 0
  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Encodes token ids.

    Args:
        input_ids: ``int [B, L]``, ``L <= max_position_embeddings``.
        attention_mask: ``[B, L]``, nonzero for real tokens and 0 for padding keys (on top of the causal
            mask), or ``None`` (Stable Diffusion passes none: padding after the end-of-text token cannot
            affect the tokens before it, and its own states are part of the context).
        clip_skip: Use the output of layer ``num_hidden_layers - clip_skip`` (then the final LayerNorm),
            as diffusers' ``clip_skip``; 0 = the last layer. Static.

    Returns:
        ``(last_hidden_state [B, L, D], pooled [B, D])``, float32 in ``dtype``.

    Raises:
        ValueError: On malformed inputs or an invalid configuration (the message names the argument).
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int [B, L], got shape {input_ids.shape}")
    b, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise ValueError(
        f"input_ids length {length} exceeds max_position_embeddings={self.max_position_embeddings}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_act not in CLIP_ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(CLIP_ACTIVATIONS)}")
    if not 0 <= clip_skip < self.num_hidden_layers:
      raise ValueError(f"clip_skip must be in [0, {self.num_hidden_layers}), got {clip_skip}")
    neg = jnp.finfo(jnp.float32).min
    causal = jnp.tril(jnp.ones((length, length), bool))
    bias = jnp.where(causal, 0.0, neg)[None, None]
    if attention_mask is not None:
      if attention_mask.shape != (b, length):
        raise ValueError(f"attention_mask must be [B, L] = {(b, length)}, got shape {attention_mask.shape}")
      bias = jnp.where(causal[None, None] & (attention_mask[:, None, None, :] != 0), 0.0, neg)
    x = _Embeddings(
      self.vocab_size, self.max_position_embeddings, self.hidden_size, self.dtype, name="embeddings"
    )(input_ids)
    x = _Encoder(
      self.num_hidden_layers,
      self.num_attention_heads,
      self.intermediate_size,
      self.hidden_act,
      self.layer_norm_eps,
      self.dtype,
      name="encoder",
    )(x, bias, self.num_hidden_layers - clip_skip)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    ids = input_ids.astype(jnp.int32)
    where = (
      jnp.argmax(ids, axis=-1) if self.eos_token_id == 2 else jnp.argmax(ids == self.eos_token_id, axis=-1)
    )
    return x, x[jnp.arange(b), where]


_CONFIG_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "max_position_embeddings",
)


def clip_text_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
  """:class:`CLIPTextModel` keyword arguments for a transformers ``CLIPTextModel`` ``config.json``.

  Args:
      config: The parsed config (``model_type`` ``"clip_text_model"``; a full ``"clip"`` config's
          ``text_config`` also works).

  Returns:
      The keyword arguments.

  Raises:
      ValueError: If a size is missing or the activation, model type or architecture is unsupported.
  """
  if config.get("model_type") == "clip" and "text_config" in config:
    config = config["text_config"]
  problems = []
  if config.get("model_type", "clip_text_model") != "clip_text_model":
    problems.append(f"model_type={config['model_type']!r} (supported: 'clip_text_model')")
  archs = config.get("architectures") or ["CLIPTextModel"]
  if any(a not in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs):
    problems.append(f"architectures={archs} (supported: CLIPTextModel, CLIPTextModelWithProjection)")
  act = config.get("hidden_act", "quick_gelu")
  if act not in CLIP_ACTIVATIONS:
    problems.append(f"hidden_act={act!r} (supported: {sorted(CLIP_ACTIVATIONS)})")
  problems += [f"{k} is missing" for k in _CONFIG_KEYS if k not in config]
  if problems:
    raise ValueError("unsupported CLIP text encoder config:\n" + "\n".join(problems))
  eos = config.get("eos_token_id", 2)
  eos = eos[0] if isinstance(eos, list) else eos
  return {
    **{k: int(config[k]) for k in _CONFIG_KEYS},
    "hidden_act": act,
    "layer_norm_eps": float(config.get("layer_norm_eps", 1e-5)),
    "eos_token_id": int(eos),
  }


def clip_text_config(
  module: CLIPTextModel, *, bos_token_id: int | None = None, pad_token_id: int | None = None
) -> dict[str, Any]:
  """The transformers ``config.json`` dict of a :class:`CLIPTextModel` (inverse of :func:`clip_text_kwargs`).

  Args:
      module: The module.
      bos_token_id: Start-of-text id to record (``eos_token_id - 1`` in CLIP's vocabulary by default).
      pad_token_id: Padding id to record (1 by default, as transformers writes).

  Returns:
      A config that ``transformers.CLIPTextModel.from_pretrained`` accepts.
  """
  return {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    **{k: int(getattr(module, k)) for k in _CONFIG_KEYS},
    "hidden_act": module.hidden_act,
    "layer_norm_eps": float(module.layer_norm_eps),
    "eos_token_id": int(module.eos_token_id),
    "bos_token_id": int(module.eos_token_id - 1 if bos_token_id is None else bos_token_id),
    "pad_token_id": int(1 if pad_token_id is None else pad_token_id),
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "projection_dim": int(module.hidden_size),
    "torch_dtype": "float32",
  }
