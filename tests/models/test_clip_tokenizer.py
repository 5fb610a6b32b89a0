"""CLIPTokenizer: the same ids as transformers' CLIPTokenizer on varied prompts, from either file layout.

The vocabulary is a small CLIP-format one learned offline (tests/pretrained/tiny_sd.py); the comparison
with transformers is skipped when it is not installed.
"""

import json
import warnings

import numpy as np
import pytest

from diffjax.models.clip_tokenizer import CLIPTokenizer
from tests.pretrained.tiny_sd import write_clip_tokenizer

PROMPTS = [
  "a photograph of an astronaut riding a horse",
  "",
  "  Hello   WORLD!!  ",
  "it's the dog's toy, isn't it? they're here; we'll see",
  "café crème brûlée, 123 4k 8K",
  "emoji 🙂 and 中文 and ümlaut",
  "a<|endoftext|>b <|startoftext|>",
  "tab\tnew\nline\r\nend",
  "hello! world! !!!",
  "x" * 30,
  "a painting of a red fox in the snow trending on artstation highly detailed sharp focus",
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1_pad", "sd2_pad"])
def tok_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer"
  write_clip_tokenizer(str(path), model_max_length=16, pad_token=request.param)
  return path


def _ours(tokenizer, prompts, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return tokenizer.encode(prompts, **kw)


def test_matches_transformers(tok_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  ref = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
  expected = ref(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
  ours = CLIPTokenizer.from_directory(tok_dir)
  ids, mask = _ours(ours, PROMPTS)
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  for p in PROMPTS[:6]:
    assert ours.tokenize(p) == ref.tokenize(p), p
  # transformers 5 saves tokenizer.json only; that layout gives the same ids.
  ref.save_pretrained(str(tmp_path / "saved"))
  assert not (tmp_path / "saved" / "vocab.json").exists()
  np.testing.assert_array_equal(_ours(CLIPTokenizer.from_directory(tmp_path / "saved"), PROMPTS)[0], ids)
  # ... and our own export is read back by both.
  ours.save_directory(tmp_path / "ours")
  np.testing.assert_array_equal(_ours(CLIPTokenizer.from_directory(tmp_path / "ours"), PROMPTS)[0], ids)
  again = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "ours"))
  np.testing.assert_array_equal(
    again(PROMPTS, padding="max_length", max_length=16, truncation=True)["input_ids"], ids
  )


def test_truncation_and_lengths(tok_dir):
  tok = CLIPTokenizer.from_directory(tok_dir)
  assert tok.model_max_length == 16
  with pytest.warns(UserWarning, match="truncated"):
    ids, mask = tok.encode(["x " * 40])
  assert ids.shape == (1, 16) and mask.all() and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  with pytest.raises(ValueError, match="more than the 14"):
    tok.encode(["x " * 40], truncate=False)
  ids, mask = tok.encode(["a horse"], max_length=8)
  n = len(tok.tokenize("a horse")) + 2
  assert ids.shape == (1, 8) and mask.sum() == n and (ids[0, n:] == tok.pad_id).all()
  for bad in ("a string", [], [3]):
    with pytest.raises(ValueError, match="prompt"):
      tok.encode(bad)
  with pytest.raises(ValueError, match="max_length"):
    tok.encode(["a"], max_length=1)


def test_directory_errors(tmp_path, tok_dir):
  with pytest.raises(FileNotFoundError, match="neither vocab.json"):
    CLIPTokenizer.from_directory(tmp_path)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "vocab.json").write_text("{not json")
  (bad / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(ValueError, match="not valid JSON"):
    CLIPTokenizer.from_directory(bad)
  vocab = json.loads((tok_dir / "vocab.json").read_text())
  with pytest.raises(ValueError, match="not in the vocabulary"):
    CLIPTokenizer(vocab, [], pad_token="<pad>")
  with pytest.raises(ValueError, match="merges use symbols"):
    CLIPTokenizer(vocab, [("zzz", "q")])
