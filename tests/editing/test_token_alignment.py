"""Token alignment of prompt-to-prompt: word swaps, refinements, blend words and reweighting."""

import numpy as np
import pytest

from diffjax.editing.token_alignment import (
  align_prompts,
  global_alignment,
  refinement_alignment,
  replacement_alignment,
  token_scales,
  word_mask,
)
from diffjax.models.text_encoder import minilm_dir
from diffjax.models.text_tokenizer import PromptTokenizer

L = 16


@pytest.fixture(scope="module")
def tok():
  return PromptTokenizer.from_file(minilm_dir() / "tokenizer.json")


def test_words_and_their_token_positions(tok):
  assert tok.tokenize("a 3 to the left of a 5")[8] == "5"
  assert tok.words("a 3 to the left of a 5")[-1] == ("5", (8,))
  words = tok.words("a zigzagging 5!")
  assert words[1][0] == "zigzagging" and len(words[1][1]) == 4 and words[-1] == ("!", (7,))


def test_word_swap_is_the_identity_on_equal_tokenisations(tok):
  a = replacement_alignment(tok, "a 3 to the left of a 5", "a 3 to the left of a 8", max_length=L)
  assert a.kind == "replace"
  np.testing.assert_array_equal(a.mapper[:10, :10], np.eye(10))
  assert a.mapper[10:].sum() == 0 and a.mapper[:, 10:].sum() == 0
  np.testing.assert_array_equal(a.alphas, (np.arange(L) < 10).astype(np.float32))


def test_word_swap_shares_a_word_between_its_pieces(tok):
  # "zigzagging" is 4 word pieces: each takes a quarter of the source word's attention.
  a = replacement_alignment(tok, "a 3 to the left of a 5", "a 3 to the left of a zigzagging", max_length=L)
  np.testing.assert_allclose(a.mapper[8, 8:12], 0.25)
  assert a.mapper[9, 12] == 1.0  # [SEP] follows
  source = np.random.default_rng(0).dirichlet(np.ones(10), size=3)
  source = np.pad(source, ((0, 0), (0, L - 10)))
  np.testing.assert_allclose((source @ a.mapper).sum(-1), 1.0, rtol=1e-6)  # the mass is kept
  back = replacement_alignment(tok, "a 3 to the left of a zigzagging", "a 3 to the left of a 5", max_length=L)
  np.testing.assert_array_equal(back.mapper[8:12, 8], 1.0)


def test_word_swap_needs_as_many_words(tok):
  with pytest.raises(ValueError, match="same number of words"):
    replacement_alignment(tok, "a 3 to the left of a 5", "a big 3 to the left of a 5", max_length=L)
  with pytest.raises(ValueError, match="tokens long"):
    replacement_alignment(tok, "a 3 to the left of a 5", "a 3 " * 9, max_length=L)


def test_global_alignment_pairs_only_equal_tokens():
  x = ["[CLS]", "a", "3", "to", "the", "left", "[SEP]"]
  y = ["[CLS]", "a", "bold", "3", "to", "the", "very", "left", "[SEP]"]
  assert global_alignment(x, y) == [0, 1, -1, 2, 3, 4, -1, 5, 6]
  assert global_alignment(y, x) == [0, 1, 3, 4, 5, 7, 8]
  assert global_alignment(["a", "b"], ["c"]) == [-1]
  assert global_alignment([], ["a"]) == [-1]


def test_refinement_keeps_own_attention_for_new_words(tok):
  a = refinement_alignment(tok, "a 3 to the left of a 5", "a bold 3 to the left of a 5", max_length=L)
  expected = [0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9]
  for j, i in enumerate(expected):
    if i < 0:
      assert a.alphas[j] == 0 and a.mapper[:, j].sum() == 0
    else:
      assert a.alphas[j] == 1 and a.mapper[i, j] == 1 and a.mapper[:, j].sum() == 1
  assert a.alphas[11:].sum() == 0
  src = "a 3 to the left of a 5"
  assert align_prompts(tok, src, "a bold 3 to the left of a 5", max_length=L).kind == "refine"
  assert align_prompts(tok, src, "a 3 to the left of a 8", max_length=L).kind == "replace"
  with pytest.raises(ValueError, match="kind"):
    align_prompts(tok, "a", "b", max_length=L, kind="swap")


def test_word_mask_and_scales(tok):
  m = word_mask(tok, "a 3 to the left of a 5", ["5", "LEFT"], max_length=L)
  assert np.flatnonzero(m).tolist() == [5, 8]
  s = token_scales(tok, "a 3 to the left of a 5", {"3": 2.0}, max_length=L)
  assert s[2] == 2.0 and s.sum() == L + 1.0
  with pytest.raises(ValueError, match="not a word"):
    token_scales(tok, "a 3 to the left of a 5", {"7": 2.0}, max_length=L)
  with pytest.raises(ValueError, match=">= 0"):
    token_scales(tok, "a 3 to the left of a 5", {"3": -1.0}, max_length=L)
