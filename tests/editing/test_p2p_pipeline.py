"""Prompt-to-prompt front end: edit arrays from prompts, and ``python -m diffjax edit --prompt/--edit``."""

import os

import jax
import numpy as np
import pytest

from diffjax import cli
from diffjax.editing.p2p_pipeline import EditControls, build_edit_spec, edit_controls
from diffjax.editing.prompt_to_prompt import check_fractions
from diffjax.models.text_encoder import minilm_dir
from diffjax.models.text_tokenizer import PromptTokenizer

L = 16
SRC = "a 3 to the left of a 5"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
  return PromptTokenizer.from_file(minilm_dir() / "tokenizer.json")


def test_edit_spec_of_a_word_swap_with_blend_and_reweight(tok):
  spec = build_edit_spec(
    tok, [SRC, SRC], ["a 3 to the left of a 8", "a bold 3 to the left of a 5"], max_length=L,
    blend_words=["8", "bold"], reweight={"3": 2.0},
  )
  assert spec.mapper.shape == (2, L, L) and spec.blend.shape == (4, L)
  np.testing.assert_array_equal(spec.mapper[0, :10, :10], np.eye(10))
  assert spec.alphas[1, 2] == 0  # "bold" is new: it keeps its own attention
  # Pair 0: "8" in the edit and the "5" it replaces in the source; pair 1: "bold" only in the edit.
  assert np.flatnonzero(spec.blend[0]).tolist() == [8] and np.flatnonzero(spec.blend[2]).tolist() == [8]
  assert not spec.blend[1].any() and np.flatnonzero(spec.blend[3]).tolist() == [2]
  assert spec.scales[0, 2] == 2.0 and spec.scales[1, 3] == 2.0 and spec.scales.sum() == 2 * (L + 1)


def test_edit_spec_per_pair_words_and_errors(tok):
  spec = build_edit_spec(
    tok, [SRC, SRC], ["a 3 to the left of a 8", "a 7 to the left of a 5"], max_length=L,
    blend_words=[["8"], ["7"]],
  )
  assert np.flatnonzero(spec.blend[0]).tolist() == [8] and np.flatnonzero(spec.blend[1]).tolist() == [2]
  with pytest.raises(ValueError, match="neither"):
    build_edit_spec(tok, [SRC], ["a 3 to the left of a 8"], max_length=L, blend_words=["9"])
  with pytest.raises(ValueError, match="one list per pair"):
    build_edit_spec(tok, [SRC], ["a 3 to the left of a 8"], max_length=L, blend_words=[["8"], ["3"]])
  with pytest.raises(ValueError, match="as many"):
    build_edit_spec(tok, [SRC], [], max_length=L)
  with pytest.raises(ValueError, match="same number of words"):
    build_edit_spec(tok, [SRC], ["a bold 3 to the left of a 5"], max_length=L, kind="replace")


def test_edit_controls_are_traced_arrays_and_fractions_are_checked_in_order(tok):
  spec = build_edit_spec(tok, [SRC], ["a 3 to the left of a 8"], max_length=L)
  c = edit_controls(spec, num_steps=7, guidance=4.0, eta=0.5, cross_replace=0.8, self_replace=0.4)
  assert isinstance(c, EditControls) and c.num_steps.dtype == np.int32 and int(c.num_steps) == 7
  for got, want in ((c.guidance, 4.0), (c.eta, 0.5), (c.cross_replace, 0.8), (c.self_replace, 0.4)):
    assert isinstance(got, jax.Array) and got.dtype == np.float32 and got.shape == ()
    assert got == np.float32(want)
  np.testing.assert_array_equal(c.spec.mapper, spec.mapper)
  check_fractions(a=0.0, b=1.0)
  with pytest.raises(ValueError, match=r"first must be in \[0, 1\]"):
    check_fractions(first=1.5, second=-1.0)
  with pytest.raises(ValueError, match="second"):
    check_fractions(first=0.5, second=-1.0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """An untrained text-to-image workdir (smoke config + one checkpoint of the initial state)."""
  from diffjax.checkpoints import Checkpointer
  from diffjax.config_files import load_config
  from diffjax.training.text_builders import build_text_run
  from diffjax.training.workdir import write_config

  path = str(tmp_path_factory.mktemp("p2p_text"))
  config = load_config(os.path.join(ROOT, "configs", "scenes_text.py") + ":smoke")
  # Quick to compile: one U-Net level and a one-layer text encoder trained with it (the token-id path).
  config.model.update(block_out_channels=(8,), cross_attention_levels=(True,))
  small = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
  config.text.update(encoder="small", small_overrides=small)
  write_config(path, config)
  _, template = build_text_run(config, workdir=path, abstract=True)  # shapes only: nothing compiled
  rng = np.random.default_rng(0)

  def fill(s):
    floating = np.issubdtype(s.dtype, np.floating)
    return (0.3 * rng.standard_normal(s.shape) if floating else np.zeros(s.shape)).astype(s.dtype)

  state = jax.tree.map(fill, template)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"))
  ckpt.save(0, state, force=True)
  ckpt.wait()
  ckpt.close()
  return path


def test_cli_prompt_to_prompt(workdir, tmp_path):
  out = str(tmp_path / "e.npz")
  argv = ["edit", "--workdir", workdir, "--prompt", SRC, "--edit", "a 3 to the left of a 8", "--steps", "3"]
  argv += ["--num", "2", "--blend-words", "8", "--reweight", "3=1.5", "--out", out]
  assert cli.main(argv) == 0
  with np.load(out) as data:
    assert data["images"].shape == data["sources"].shape == (2, 16, 32, 1)
    assert data["images"].dtype == np.uint8 and str(data["edit"]) == "a 3 to the left of a 8"
    assert not np.array_equal(data["sources"][0], data["sources"][1])  # each pair has its own noise
  assert os.path.isfile(out[:-4] + ".png")


@pytest.mark.parametrize(
  "extra, needle",
  [
    (["--prompt", SRC], "needs both --prompt"),
    (["--prompt", SRC, "--edit", SRC, "--image", "x.png"], "either --image"),
    ([], "either --image"),
    (["--prompt", SRC, "--edit", SRC, "--reweight", "3"], "WORD=SCALE"),
    (["--prompt", SRC, "--edit", SRC, "--cross-replace", "1.5"], "--cross-replace must be in [0, 1]"),
    (["--prompt", SRC, "--edit", SRC, "--label", "3"], "belong to SDEdit"),
    (["--prompt", SRC, "--edit", "a 3 to the left of a 8", "--blend-words", "9"], "neither"),
    (["--prompt", SRC, "--edit", SRC, "--reweight", "7=2"], "not a word"),
  ],
)
def test_cli_prompt_to_prompt_errors(workdir, tmp_path, capsys, extra, needle):
  argv = ["edit", "--workdir", workdir, "--steps", "2", "--out", str(tmp_path / "e.npz"), *extra]
  assert cli.main(argv) == 2
  assert needle in capsys.readouterr().err
