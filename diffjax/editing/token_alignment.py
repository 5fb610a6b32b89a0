"""Which tokens of an edited prompt take which source tokens' cross-attention (prompt-to-prompt).

Prompt-to-prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control",
Sec. 3.2) injects the source prompt's cross-attention maps ``M`` into the edited prompt's run. The two
prompts' tokens are matched by a :class:`TokenAlignment`: the edited run attends with
``M* = (M @ mapper) * alphas + M_own * (1 - alphas)`` per key token. As in the authors' ``seq_aligner.py``:

* **word swap** (:func:`replacement_alignment`): both prompts have the same number of words; word ``k``
  of the edit takes the attention of word ``k`` of the source. A word split into a different number of
  word pieces shares the source word's attention evenly, so the attention mass is kept;
* **refinement** (:func:`refinement_alignment`): the edit adds (or drops) words. Tokens are aligned by a
  global alignment (Needleman & Wunsch 1970; match +1, mismatch -1, gap 0, so tokens are only paired
  with equal tokens); aligned tokens take the source's attention, new tokens keep their own.

Positions are those of :meth:`~diffjax.models.text_tokenizer.PromptTokenizer.tokenize` (``[CLS]`` at 0),
which are the rows of the padded ``[L]`` context. Padding positions get neither mapped nor own attention
(both are 0 under the context mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from diffjax.models.text_tokenizer import PromptTokenizer

__all__ = [
  "TokenAlignment",
  "align_prompts",
  "global_alignment",
  "map_padding",
  "refinement_alignment",
  "replacement_alignment",
  "token_scales",
  "word_mask",
]

ALIGNMENTS = ("auto", "replace", "refine")


@dataclasses.dataclass(frozen=True)
class TokenAlignment:
  """How the edited prompt's tokens take the source prompt's cross-attention.

  Attributes:
      mapper: float32 ``[L, L]``; the mapped attention of edit token ``j`` is
          ``sum_i source[..., i] * mapper[i, j]``.
      alphas: float32 ``[L]``; 1 where edit token ``j`` takes the mapped attention, 0 where it keeps its
          own (new words and padding).
      kind: ``"replace"`` or ``"refine"``.
  """

  mapper: np.ndarray
  alphas: np.ndarray
  kind: str


def _check(tokenizer: PromptTokenizer, prompts: Sequence[str], max_length: int) -> None:
  tokenizer.encode(list(prompts), max_length=max_length)  # raises on a too-long prompt


def _units(tokenizer: PromptTokenizer, prompt: str) -> list[tuple[str, tuple[int, ...]]]:
  """``[CLS]``, every word, ``[SEP]`` as ``(text, token positions)``."""
  n = len(tokenizer.tokenize(prompt))
  return [("[CLS]", (0,)), *tokenizer.words(prompt), ("[SEP]", (n - 1,))]


def replacement_alignment(
  tokenizer: PromptTokenizer, source: str, edit: str, *, max_length: int
) -> TokenAlignment:
  """Word-swap alignment: word ``k`` of ``edit`` takes the attention of word ``k`` of ``source``.

  Args:
      tokenizer: The text encoder's tokenizer.
      source: The source prompt, e.g. ``"a 3 to the left of a 5"``.
      edit: The edited prompt with the same number of words, e.g. ``"a 3 to the left of a 8"``.
      max_length: Padded prompt length ``L``.

  Returns:
      The alignment (``alphas`` 1 on every real token of ``edit``).

  Raises:
      ValueError: If the prompts have different numbers of words or are too long.
  """
  _check(tokenizer, [source, edit], max_length)
  src, dst = _units(tokenizer, source), _units(tokenizer, edit)
  if len(src) != len(dst):
    raise ValueError(
      f"a word swap needs prompts with the same number of words: {source!r} has {len(src) - 2}, "
      f"{edit!r} has {len(dst) - 2} (use a refinement for added words)"
    )
  mapper = np.zeros((max_length, max_length), np.float32)
  alphas = np.zeros((max_length,), np.float32)
  for (_, i), (_, j) in zip(src, dst, strict=True):
    if len(i) == len(j):
      mapper[list(i), list(j)] = 1.0
    else:  # the source word's attention is shared by the edit word's pieces: the total is kept
      mapper[np.ix_(i, j)] = 1.0 / len(j)
    alphas[list(j)] = 1.0
  return TokenAlignment(mapper=mapper, alphas=alphas, kind="replace")


def global_alignment(x: Sequence, y: Sequence) -> list[int]:
  """Needleman-Wunsch alignment (match +1, mismatch -1, gap 0) of two token sequences.

  Ties are broken as in prompt-to-prompt's ``seq_aligner.global_align`` (a gap in ``x`` first, then a
  gap in ``y``, then the diagonal), so the result matches the authors' mapper.

  Args:
      x: Source tokens.
      y: Edit tokens.

  Returns:
      For each position of ``y``, the position of ``x`` it is aligned with, or ``-1`` (a new token).
  """
  n, m = len(x), len(y)
  score = np.zeros((n + 1, m + 1), np.int64)
  trace = np.zeros((n + 1, m + 1), np.int8)
  trace[0, 1:], trace[1:, 0] = 1, 2
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      left, up = score[i, j - 1], score[i - 1, j]
      diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
      best = max(left, up, diag)
      score[i, j] = best
      trace[i, j] = 1 if best == left else 2 if best == up else 3
  out = [-1] * m
  i, j = n, m
  while i > 0 or j > 0:
    if trace[i, j] == 3:
      i, j = i - 1, j - 1
      out[j] = i
    elif trace[i, j] == 1:
      j -= 1
    else:
      i -= 1
  return out


def refinement_alignment(
  tokenizer: PromptTokenizer, source: str, edit: str, *, max_length: int
) -> TokenAlignment:
  """Refinement alignment: tokens of ``edit`` equal to aligned tokens of ``source`` take their attention.

  Args:
      tokenizer: The text encoder's tokenizer.
      source: The source prompt, e.g. ``"a 3 to the left of a 5"``.
      edit: The refined prompt, e.g. ``"a bold 3 to the left of a 5"``.
      max_length: Padded prompt length ``L``.

  Returns:
      The alignment (``alphas`` 0 on the new tokens and on padding).

  Raises:
      ValueError: If a prompt is too long.
  """
  _check(tokenizer, [source, edit], max_length)
  src, dst = tokenizer.tokenize(source), tokenizer.tokenize(edit)
  mapper = np.zeros((max_length, max_length), np.float32)
  alphas = np.zeros((max_length,), np.float32)
  for j, i in enumerate(global_alignment(src, dst)):
    if i >= 0:
      mapper[i, j], alphas[j] = 1.0, 1.0
  return TokenAlignment(mapper=mapper, alphas=alphas, kind="refine")


def align_prompts(
  tokenizer: PromptTokenizer, source: str, edit: str, *, max_length: int, kind: str = "auto"
) -> TokenAlignment:
  """A word swap when the prompts have as many words (``kind="auto"``), else a refinement.

  Raises:
      ValueError: On an unknown ``kind`` or prompts that do not fit it.
  """
  if kind not in ALIGNMENTS:
    raise ValueError(f"alignment kind={kind!r} is not one of {ALIGNMENTS}")
  if kind == "auto":
    same = len(tokenizer.words(source)) == len(tokenizer.words(edit))
    kind = "replace" if same else "refine"
  fn = replacement_alignment if kind == "replace" else refinement_alignment
  return fn(tokenizer, source, edit, max_length=max_length)


def word_mask(
  tokenizer: PromptTokenizer, prompt: str, words: Sequence[str], *, max_length: int
) -> np.ndarray:
  """float32 ``[L]``: 1 on the tokens of every occurrence of ``words`` in ``prompt`` (case-insensitive).

  Words absent from the prompt are skipped; the caller decides whether that is an error.
  """
  _check(tokenizer, [prompt], max_length)
  wanted = {w.lower() for w in words}
  out = np.zeros((max_length,), np.float32)
  for text, positions in tokenizer.words(prompt):
    if text.lower() in wanted:
      out[list(positions)] = 1.0
  return out


def token_scales(
  tokenizer: PromptTokenizer, prompt: str, scales: Mapping[str, float], *, max_length: int
) -> np.ndarray:
  """float32 ``[L]`` attention reweighting: ``scales[word]`` on that word's tokens, 1 elsewhere.

  Raises:
      ValueError: If a word is not in ``prompt`` or a scale is negative.
  """
  out = np.ones((max_length,), np.float32)
  for word, scale in scales.items():
    if not scale >= 0:
      raise ValueError(f"reweight scale of {word!r} must be >= 0, got {scale}")
    where = word_mask(tokenizer, prompt, [word], max_length=max_length) > 0
    if not where.any():
      words = [w for w, _ in tokenizer.words(prompt)]
      raise ValueError(f"reweight word {word!r} is not a word of {prompt!r} (its words: {words})")
    out[where] = float(scale)
  return out


def map_padding(mapper: np.ndarray, alphas: np.ndarray, *, source_length: int, edit_length: int):
  """Also maps the padding of an unmasked context (Stable Diffusion's), as the authors' code does.

  Stable Diffusion attends to every one of its 77 positions, padding included, so in the authors'
  ``seq_aligner`` the padding positions of the edit take the source's attention too (identity after the
  last replaced word; ``len(y) + k`` for refinements). Here padding position ``edit_length + k`` of the edit
  takes source position ``source_length + k`` (while it is inside the row) with alpha 1.

  Args:
      mapper: ``[L, L]`` of a :class:`TokenAlignment` (not modified).
      alphas: ``[L]`` of it (not modified).
      source_length: Tokens of the source prompt, start and end tokens included.
      edit_length: Tokens of the edited prompt, likewise.

  Returns:
      ``(mapper, alphas)`` copies with the padding mapped.
  """
  mapper, alphas = np.array(mapper, np.float32), np.array(alphas, np.float32)
  size = mapper.shape[0]
  for k in range(size - max(source_length, edit_length)):
    mapper[source_length + k, edit_length + k] = 1.0
    alphas[edit_length + k] = 1.0
  return mapper, alphas
