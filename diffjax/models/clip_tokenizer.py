"""CLIP's byte-level BPE tokenizer, built from a model directory's ``vocab.json`` and ``merges.txt``.

CLIP (Radford et al. 2021) tokenizes lower-cased text with a byte-level byte-pair encoding (Sennrich et al.
2016; byte level as in GPT-2, Radford et al. 2019) whose word-final symbols carry a ``</w>`` suffix, and
wraps every prompt in ``<|startoftext|> ... <|endoftext|>``. Stable Diffusion pads the ids to the text
encoder's 77 positions with the padding token (``<|endoftext|>`` in SD 1.x, ``!`` in SD 2.x) and feeds all
of them, padding included, to the text encoder.

:class:`CLIPTokenizer` assembles the same pipeline as transformers' ``CLIPTokenizer`` (a ``tokenizers``
backend since transformers 5; ``transformers/models/clip/tokenization_clip.py``) with the ``tokenizers``
library alone, no transformers or Python-code files at run time:

* special tokens (start, end, unknown, padding) matched in the raw text first;
* normalisation: Unicode NFC, every run of whitespace to one space, lower case;
* pre-tokenisation by CLIP's regex ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|
  [\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (whitespace dropped), then the GPT-2 byte-to-unicode mapping;
* BPE with the ``</w>`` end-of-word suffix and the merges in rank order;
* ``<|startoftext|>`` + ids + ``<|endoftext|>``, truncated and padded to ``model_max_length``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = ["CLIP_PATTERN", "CLIPTokenizer"]

CLIP_PATTERN = (
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_DEFAULTS = {
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
}


def _token_text(value: Any) -> str | None:
  """A special token from ``tokenizer_config.json``: a string or a serialised ``AddedToken`` dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"unrecognised special token entry {value!r}: expected a string or {{'content': ...}}")


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"'{path}' is not valid JSON: {err}") from err


def _read_merges(path: Path) -> list[tuple[str, str]]:
  merges = []
  for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
    if not line.strip() or (n == 1 and line.startswith("#version")):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise ValueError(f"'{path}' line {n} is not a merge of two symbols: {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def _bpe_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  data = _read_json(path)
  model = data.get("model") if isinstance(data, dict) else None
  if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
    raise ValueError(f"'{path}' does not hold a CLIP BPE model (type 'BPE' with end_of_word_suffix '</w>')")
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
  if any(len(m) != 2 for m in merges):
    raise ValueError(f"'{path}': every merge must join two symbols")
  vocab = dict(model.get("vocab", {}))
  for added in data.get("added_tokens") or []:
    vocab.setdefault(added["content"], added["id"])
  return vocab, merges


class CLIPTokenizer:
  """Encodes prompts to ``[B, model_max_length]`` CLIP token ids.

  Args:
      vocab: ``{token: id}`` (``vocab.json``), special tokens included.
      merges: BPE merges in rank order (``merges.txt`` without its ``#version`` line).
      bos_token: Start-of-text token.
      eos_token: End-of-text token.
      unk_token: Token for unknown symbols.
      pad_token: Padding token.
      model_max_length: Padded length (77 in Stable Diffusion).
      name: Where it came from (messages and ``repr``).

  Raises:
      ValueError: If a special token is not in ``vocab``, a merge uses a symbol the vocabulary lacks, or
          ``model_max_length < 2``.
  """

  def __init__(
    self,
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    *,
    bos_token: str = _DEFAULTS["bos_token"],
    eos_token: str = _DEFAULTS["eos_token"],
    unk_token: str = _DEFAULTS["unk_token"],
    pad_token: str = _DEFAULTS["pad_token"],
    model_max_length: int = 77,
    name: str = "CLIP tokenizer",
  ):
    vocab = {str(k): int(v) for k, v in vocab.items()}
    specials = {
      "bos_token": bos_token,
      "eos_token": eos_token,
      "unk_token": unk_token,
      "pad_token": pad_token,
    }
    missing = [f"{k}={v!r}" for k, v in specials.items() if v not in vocab]
    if missing:
      raise ValueError(f"{name}: special tokens {', '.join(missing)} are not in the vocabulary")
    bad = [f"{a} {b}" for a, b in merges if a not in vocab or b not in vocab or a + b not in vocab]
    if bad:
      raise ValueError(f"{name}: {len(bad)} merges use symbols missing from the vocabulary, e.g. {bad[:3]}")
    if int(model_max_length) < 2:
      raise ValueError(f"{name}: model_max_length must be >= 2, got {model_max_length}")
    self.name = name
    self.vocab, self.merges = vocab, [tuple(m) for m in merges]
    self.special_tokens = specials
    self.model_max_length = int(model_max_length)
    self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
    self.pad_id = vocab[pad_token]
    self.vocab_size = max(vocab.values()) + 1
    bpe = BPE(
      vocab=vocab,
      merges=list(merges),
      continuing_subword_prefix="",
      end_of_word_suffix="</w>",
      fuse_unk=False,
      unk_token=unk_token,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
      ]
    )
    tok.add_special_tokens(
      [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials.values())]
    )
    self._tokenizer = tok

  @classmethod
  def from_directory(cls, path: str | os.PathLike) -> CLIPTokenizer:
    """Reads a ``tokenizer/`` directory of a diffusers pipeline (or any CLIP tokenizer directory).

    The vocabulary and merges come from ``vocab.json`` + ``merges.txt`` (the layout of the Stable
    Diffusion repositories) or, without them, from the BPE model inside ``tokenizer.json`` (what
    transformers 5 writes); special tokens and ``model_max_length`` from ``tokenizer_config.json`` and
    ``special_tokens_map.json`` when present. Plain JSON and text; nothing is executed.

    Args:
        path: The directory.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: If the directory has neither ``vocab.json`` + ``merges.txt`` nor ``tokenizer.json``.
        ValueError: If a file cannot be parsed, is not a CLIP BPE, or the special tokens are inconsistent.
    """
    path = Path(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
      vocab = _read_json(path / "vocab.json")
      if not isinstance(vocab, dict):
        raise ValueError(f"'{path / 'vocab.json'}' must hold a {{token: id}} object")
      merges = _read_merges(path / "merges.txt")
    elif (path / "tokenizer.json").is_file():
      vocab, merges = _bpe_from_tokenizer_json(path / "tokenizer.json")
    else:
      raise FileNotFoundError(
        f"CLIP tokenizer directory '{path}' has neither vocab.json + merges.txt nor tokenizer.json"
      )
    settings: dict[str, Any] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
      if (path / fname).is_file():
        data = _read_json(path / fname)
        settings.update({k: _token_text(data[k]) for k in _DEFAULTS if data.get(k) is not None})
        if "model_max_length" in data:
          settings["model_max_length"] = data["model_max_length"]
    length = settings.pop("model_max_length", 77)
    if not isinstance(length, int) or length > 1_000_000:  # transformers writes 1e30 for "unbounded"
      raise ValueError(f"'{path}': model_max_length must be the text encoder's length, got {length!r}")
    return cls(vocab, merges, **settings, model_max_length=length, name=str(path))

  def save_directory(self, path: str | os.PathLike) -> None:
    """Writes ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``.

    The layout of the Stable Diffusion repositories, which :meth:`from_directory` and transformers'
    ``CLIPTokenizer.from_pretrained`` both read.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in self.merges)
    (path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(self.special_tokens, indent=2), encoding="utf-8")
    config = {
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": self.model_max_length,
      **self.special_tokens,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

  def __repr__(self) -> str:
    return (
      f"CLIPTokenizer({self.name!r}, vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"
    )

  def tokenize(self, prompt: str) -> list[str]:
    """BPE tokens of one prompt without the special start/end tokens (for inspection)."""
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")  # noqa: TRY004
    return list(self._tokenizer.encode(prompt, add_special_tokens=False).tokens)

  def words(self, prompt: str) -> list[tuple[str, tuple[int, ...]]]:
    """The words of one prompt and the positions of their tokens in its id row (start token at 0).

    Words are CLIP's pre-tokenized pieces (letter runs, single digits, punctuation runs), e.g.
    ``words("a red fox")`` is ``[("a", (1,)), ("red", (2,)), ("fox", (3,))]`` when each is one BPE token.
    Used by prompt-to-prompt's token alignment (:mod:`diffjax.editing.token_alignment`).
    """
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")  # noqa: TRY004
    enc = self._tokenizer.encode(prompt, add_special_tokens=False)
    positions: dict[int, list[int]] = {}
    for pos, word in enumerate(enc.word_ids):
      if word is not None:
        positions.setdefault(word, []).append(pos + 1)
    return [
      (prompt[enc.offsets[p[0] - 1][0] : enc.offsets[p[-1] - 1][1]], tuple(p))
      for _, p in sorted(positions.items())
    ]

  def encode(
    self, prompts: Sequence[str], *, max_length: int | None = None, truncate: bool = True
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes prompts to padded id rows, as diffusers' Stable Diffusion pipelines do.

    Args:
        prompts: ``B >= 1`` strings (``""`` is the unconditional prompt).
        max_length: Row length ``L`` (>= 2); ``None`` = ``model_max_length``.
        truncate: Cut a prompt longer than ``L - 2`` tokens (keeping start and end tokens) with a warning,
            as diffusers does; ``False`` raises instead.

    Returns:
        ``(input_ids, attention_mask)``, both ``int32 [B, L]``; the mask is 1 from the start token to the
        end token and 0 on padding.

    Raises:
        ValueError: On bad prompts or ``max_length``, or a too-long prompt with ``truncate=False``.
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or len(prompts) == 0:
      raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for i, p in enumerate(prompts):
      if not isinstance(p, str):
        raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}: {p!r}")  # noqa: TRY004
    length = self.model_max_length if max_length is None else max_length
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 2:
      raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    length = int(length)
    ids = np.full((len(prompts), length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
    for i, (prompt, enc) in enumerate(zip(prompts, encodings, strict=True)):
      body = list(enc.ids)
      if len(body) > length - 2:
        if not truncate:
          raise ValueError(
            f"prompt {i} {prompt!r} has {len(body)} tokens, more than the {length - 2} that fit in {length}"
          )
        warnings.warn(
          f"prompt {i} truncated to its first {length - 2} of {len(body)} tokens (CLIP's limit)", stacklevel=2
        )
        body = body[: length - 2]
      row = [self.bos_id, *body, self.eos_id]
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return ids, mask
