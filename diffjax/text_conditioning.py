"""Text conditions as ``model_fn`` inputs: prompt encoding, caption dropout and the null prompt.

A text-conditioned denoiser is one more ``model_fn(params, x_t, t, cond)``: ``cond`` is a pair
``(tokens, mask)`` of ``[B, L, ...]`` arrays, so losses, samplers and classifier-free guidance (which
concatenates conditions leaf by leaf) take it unchanged. Two encoders give two kinds of pair
(:mod:`diffjax.models.text_encoder`):

* frozen (``"minilm"``, all-MiniLM-L6-v2): ``cond = (context [B, L, D] float32, mask [B, L])``, the
  encoder's hidden states, computed once per caption on the host (:meth:`PromptEncoder.encode`), as
  latent diffusion does with its frozen text encoders (Rombach et al. 2022, Sec. 3.3);
* trainable (``"small"``): ``cond = (input_ids [B, L] int32, mask [B, L])`` and the encoder runs inside
  the ``model_fn`` with its parameters ``params["text_encoder"]`` next to ``params["unet"]``, trained
  jointly with the U-Net.

The null condition of classifier-free guidance (Ho & Salimans 2022) is the empty prompt ``""`` encoded
the same way (``[CLS] [SEP]`` plus padding): training replaces a caption by it with probability ``p``
(:func:`drop_condition`), sampling uses it for the unconditional branch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.text_encoder import (
  TEXT_ENCODERS,
  TextTransformer,
  build_text_encoder,
  encode_prompts,
  load_pretrained_text_encoder,
)
from diffjax.models.text_tokenizer import PromptTokenizer

__all__ = ["NULL_PROMPT", "PromptEncoder", "drop_condition", "make_text_model_fn"]

NULL_PROMPT = ""
TextCond = tuple[jnp.ndarray, jnp.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEncoder:
  """Turns prompts into the ``cond`` pairs of a text-conditioned ``model_fn``.

  Attributes:
      kind: ``"minilm"`` (frozen; conditions are hidden states) or ``"small"`` (trainable; conditions
          are token ids and the model_fn encodes them).
      module: The text transformer.
      params: Its parameters (for ``"small"``: the initial ones; the trained ones live in the model
          parameters under ``"text_encoder"``).
      tokenizer: The WordPiece tokenizer.
      max_length: Padded prompt length ``L`` (special tokens included).
  """

  kind: str
  module: TextTransformer
  params: Any
  tokenizer: PromptTokenizer
  max_length: int

  @classmethod
  def build(
    cls, *, kind: str, max_length: int, key: jax.Array | None = None, **overrides: Any
  ) -> PromptEncoder:
    """Loads (``"minilm"``) or initialises (``"small"``, needs ``key``) the encoder by name.

    The pretrained encoder is read once per process and shared (its parameters are never updated).

    Raises:
        ValueError: On an unknown kind (see :func:`~diffjax.models.text_encoder.build_text_encoder`).
        FileNotFoundError: If the pretrained package is missing.
    """
    if kind not in TEXT_ENCODERS:
      raise ValueError(f"text encoder kind={kind!r} is not one of {TEXT_ENCODERS}")
    if kind == "minilm" and not overrides:
      module, params, tokenizer = _pretrained()
    else:
      module, params, tokenizer = build_text_encoder(kind=kind, key=key, **overrides)
    if max_length > module.max_position_embeddings:
      raise ValueError(f"max_length={max_length} exceeds the encoder's {module.max_position_embeddings}")
    return cls(kind=kind, module=module, params=params, tokenizer=tokenizer, max_length=int(max_length))

  @property
  def trainable(self) -> bool:
    """Whether the encoder trains with the U-Net (its conditions are token ids)."""
    return self.kind != "minilm"

  @property
  def context_dim(self) -> int:
    """Width ``D`` of the context the U-Net cross-attends to."""
    return int(self.module.hidden_size)

  def check_prompts(self, prompts: Sequence[str]) -> None:
    """Raises ``ValueError`` naming the first prompt longer than ``max_length`` tokens."""
    self.tokenizer.encode(list(prompts), max_length=self.max_length)

  def encode(self, prompts: Sequence[str], *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The condition pair of each prompt, on the host.

    Args:
        prompts: ``B`` strings; ``""`` is the null prompt.
        batch_size: Prompts per encoder call (frozen encoder only).

    Returns:
        ``(tokens, mask)``: float32 ``[B, L, D]`` hidden states (frozen) or int32 ``[B, L]`` token ids
        (trainable), and int32 ``[B, L]`` attention mask.

    Raises:
        ValueError: If a prompt is too long or not a string.
    """
    prompts = list(prompts)
    if self.trainable:
      return self.tokenizer.encode(prompts, max_length=self.max_length)
    self.check_prompts(prompts)
    parts = []
    for i in range(0, len(prompts), batch_size):
      chunk = prompts[i : i + batch_size]
      # Pad to a power of two (at least 8): few batch shapes, few compilations of the encoder.
      padded = min(batch_size, max(8, 1 << (len(chunk) - 1).bit_length()))
      ctx, mask = encode_prompts(
        module=self.module,
        params=self.params,
        tokenizer=self.tokenizer,
        prompts=chunk + [NULL_PROMPT] * (max(padded, len(chunk)) - len(chunk)),
        max_length=self.max_length,
      )
      parts.append((np.asarray(ctx)[: len(chunk)], np.asarray(mask)[: len(chunk)]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  def null_condition(self) -> tuple[np.ndarray, np.ndarray]:
    """The condition of the empty prompt, ``[1, L, ...]`` and ``[1, L]``."""
    return self.encode([NULL_PROMPT])


@functools.lru_cache(maxsize=1)
def _pretrained() -> tuple[TextTransformer, Any, PromptTokenizer]:
  return load_pretrained_text_encoder()


def make_text_model_fn(
  unet: nn.Module,
  *,
  text_module: TextTransformer | None = None,
  train: bool = False,
  dropout_key: jax.Array | None = None,
) -> Callable:
  """Wraps a :class:`~diffjax.models.UNetCondition` as ``model_fn(params, x_t, t, cond)``.

  Args:
      unet: The cross-attention U-Net, called as ``unet.apply(v, x, t, context, mask, train=...)``.
      text_module: ``None`` when ``cond`` carries encoder hidden states (frozen encoder); the trainable
          text encoder when ``cond`` carries token ids, in which case ``params`` is
          ``{"unet": ..., "text_encoder": ...}``.
      train: Enables dropout.
      dropout_key: PRNG key of the dropout masks (with ``train``).

  Returns:
      ``model_fn(params, x_t [B, H, W, C], t [B], cond=(tokens, mask)) -> [B, H, W, C_out]``.
  """
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None

  def model_fn(params, x_t, t, cond):
    tokens, mask = cond
    unet_params = params
    if text_module is not None:
      unet_params = params["unet"]
      tokens = text_module.apply({"params": params["text_encoder"]}, tokens, mask)
    return unet.apply({"params": unet_params}, x_t, t, tokens, mask, train=train, rngs=rngs)

  return model_fn


def drop_condition(key: jax.Array, cond: Any, *, null_cond: Any, p: float) -> Any:
  """Replaces each example's condition by the null condition with probability ``p`` (caption dropout).

  Args:
      key: PRNG key.
      cond: Pytree of ``[B, ...]`` arrays (e.g. ``(context, mask)``).
      null_cond: Pytree of the same structure with ``[1, ...]`` (or ``[B, ...]``) leaves.
      p: Drop probability.

  Returns:
      The pytree with the dropped rows replaced, same shapes and dtypes as ``cond``.
  """
  leaves = jax.tree.leaves(cond)
  drop = jax.random.bernoulli(key, p, (leaves[0].shape[0],))

  def pick(c, n):
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)
    return jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), n, c)

  return jax.tree.map(pick, cond, null_cond)
