"""Prompt tokenization for the text encoders: a thin wrapper over a Hugging Face ``tokenizers`` file.

:class:`PromptTokenizer` turns a batch of prompts into fixed-length ``int32`` token ids and an attention
mask, the input of :class:`diffjax.models.text_encoder.TextTransformer`. It reads a ``tokenizer.json``
(the fast-tokenizer format of the ``tokenizers`` library, e.g. the WordPiece tokenizer of
all-MiniLM-L6-v2) and adds the special tokens that the file's post-processor defines (``[CLS] ... [SEP]``
for BERT). Padding and truncation settings stored in the file are ignored: every batch is padded to the
``max_length`` the caller asks for, and a prompt that does not fit is an error unless truncation is asked
for explicitly, so a caption is never cut short silently.

The empty prompt ``""`` encodes to ``[CLS] [SEP]`` followed by padding; it is the null condition of
classifier-free guidance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tokenizers

__all__ = ["PromptTokenizer"]

_PAD_TOKENS = ("[PAD]", "<pad>")


class PromptTokenizer:
  """Encodes prompts to padded ``[B, L]`` token ids and attention masks.

  Args:
      tokenizer: A ``tokenizers.Tokenizer``; it is copied, so the caller's object is left unchanged.
      name: Where the tokenizer came from (used in messages and ``repr``).

  Raises:
      ValueError: If the tokenizer has no padding token (``[PAD]`` or ``<pad>``) and no padding id set.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, name: str = "tokenizer"):
    pad_id = (tokenizer.padding or {}).get("pad_id")
    if pad_id is None:
      pad_id = next(
        (tokenizer.token_to_id(t) for t in _PAD_TOKENS if tokenizer.token_to_id(t) is not None), None
      )
    if pad_id is None:
      raise ValueError(f"tokenizer {name!r} defines no padding token ({' or '.join(_PAD_TOKENS)})")
    self._pad_id = int(pad_id)
    self._name = name
    self._tokenizer = self._copy(tokenizer)
    self._truncating: dict[int, tokenizers.Tokenizer] = {}

  @staticmethod
  def _copy(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> PromptTokenizer:
    """Reads a ``tokenizer.json`` file.

    Args:
        path: The ``tokenizer.json`` (``tokenizers`` library format; no pickle, no Python code).

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file cannot be parsed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file '{path}' does not exist")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on parse errors.
      raise ValueError(f"could not read tokenizer file '{path}': {err}") from err
    return cls(tokenizer, name=path)

  @property
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included."""
    return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

  @property
  def pad_id(self) -> int:
    """Id of the padding token."""
    return self._pad_id

  def __repr__(self) -> str:
    return f"PromptTokenizer({self._name!r}, vocab_size={self.vocab_size})"

  def _truncating_tokenizer(self, max_length: int) -> tokenizers.Tokenizer:
    if max_length not in self._truncating:
      tok = self._copy(self._tokenizer)
      tok.enable_truncation(max_length)  # Keeps the special tokens: [CLS] ... [SEP].
      self._truncating[max_length] = tok
    return self._truncating[max_length]

  def tokenize(self, prompt: str) -> list[str]:
    """The tokens of one prompt, special tokens included (for inspection), e.g. ``['[CLS]', 'a', ...]``."""
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")  # noqa: TRY004
    return list(self._tokenizer.encode(prompt).tokens)

  def words(self, prompt: str) -> list[tuple[str, tuple[int, ...]]]:
    """The words of one prompt and the positions of their tokens in :meth:`tokenize`'s list.

    Words are the tokenizer's pre-tokenized words (whitespace- and punctuation-separated); special tokens
    belong to no word. E.g. ``words("a zigzag 5")`` is ``[("a", (1,)), ("zigzag", (2, 3, 4)), ("5", (5,))]``
    when ``zigzag`` is split into three word pieces after ``[CLS]``.
    """
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")  # noqa: TRY004
    enc = self._tokenizer.encode(prompt)
    positions: dict[int, list[int]] = {}
    for pos, word in enumerate(enc.word_ids):
      if word is not None:
        positions.setdefault(word, []).append(pos)
    return [
      (prompt[enc.offsets[p[0]][0] : enc.offsets[p[-1]][1]], tuple(p))
      for _, p in sorted(positions.items())
    ]

  def encode(
    self, prompts: Sequence[str], *, max_length: int, truncate: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch of prompts and pads it to ``max_length``.

    Args:
        prompts: ``B >= 1`` strings (a list or tuple, not a single string); ``""`` is allowed.
        max_length: Length ``L`` of every row, special tokens included (``>= 2``).
        truncate: Cut prompts longer than ``max_length`` tokens (keeping the closing special token)
            instead of raising.

    Returns:
        ``(input_ids, attention_mask)``: ``int32 [B, L]`` token ids (padding id after the prompt) and
        ``int32 [B, L]`` mask, 1 for the prompt's tokens and 0 for padding.

    Raises:
        ValueError: If ``prompts`` is empty or a bare string, a prompt is not a string, ``max_length``
            is not an int >= 2, or (without ``truncate``) a prompt has more than ``max_length`` tokens.
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
      # ValueError for every bad argument, as elsewhere in diffjax, so callers catch one type.
      raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")  # noqa: TRY004
    if len(prompts) == 0:
      raise ValueError("prompts is empty: need at least one prompt (use '' for the null condition)")
    for i, prompt in enumerate(prompts):
      if not isinstance(prompt, str):
        raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}: {prompt!r}")  # noqa: TRY004
    if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 2:
      raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    max_length = int(max_length)
    tokenizer = self._truncating_tokenizer(max_length) if truncate else self._tokenizer
    encodings = tokenizer.encode_batch(list(prompts))
    ids = np.full((len(prompts), max_length), self._pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), max_length), dtype=np.int32)
    for i, (prompt, enc) in enumerate(zip(prompts, encodings, strict=True)):
      n = len(enc.ids)
      if n > max_length:
        raise ValueError(
          f"prompt {i} {prompt!r} is {n} tokens long (special tokens included), more than "
          f"max_length={max_length}; shorten it, raise max_length or pass truncate=True"
        )
      ids[i, :n] = enc.ids
      mask[i, :n] = 1
    return ids, mask
