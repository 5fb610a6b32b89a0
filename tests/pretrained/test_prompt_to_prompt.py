"""Prompt-to-prompt on the session's tiny imported Stable-Diffusion pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.editing.prompt_to_prompt import prompt_to_prompt_control
from diffjax.models.attention_control import chain_controls
from diffjax.pretrained import prompt_to_prompt as p2p
from diffjax.pretrained.pipeline import encode_prompts, make_text_to_image, make_unet_fn

SOURCES = ["a red fox in the snow", "a fox in the snow"]
EDITS = ["a red dog in the snow", "a red fox in the snow"]  # a word swap and a refinement
STEPS = 4


@pytest.fixture(scope="module")
def setup(tiny_loaded):
  sd, params = tiny_loaded
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  edit = p2p.make_prompt_to_prompt(sd)
  cache = {}

  def run(cross, self_=0.0):
    if (cross, self_) not in cache:
      out = edit(
        params, jax.random.key(0), SOURCES, EDITS, num_steps=STEPS, guidance=7.5, cross_replace=cross,
        self_replace=self_, latents=latents,
      )
      cache[cross, self_] = tuple(np.asarray(v) for v in out)
    return cache[cross, self_]

  return sd, params, latents, run


def test_step_index_follows_the_table(tiny_loaded):
  sd, _ = tiny_loaded
  for n in (1, 3, 5):
    table = sd.scheduler.table(n)
    visited = np.asarray(table.timesteps[:n])[::-1]  # first step = largest timestep
    got = [int(p2p.step_index(table, jnp.int32(n), t)) for t in visited]
    assert got == list(range(n))


def test_edit_spec_of_the_pipeline_tokenizer(tiny_loaded):
  sd, _ = tiny_loaded
  length = sd.tokenizer.model_max_length
  spec = p2p.pipeline_edit_spec(sd.tokenizer, SOURCES, EDITS)
  assert spec.mapper.shape == (2, length, length)
  # Word swap with equal tokenisations: every position, padding included, takes the source's attention.
  np.testing.assert_array_equal(spec.mapper[0], np.eye(length))
  np.testing.assert_array_equal(spec.alphas[0], 1.0)
  # Refinement: "red" (position 2) is new and keeps its own; the rest shifts by one, padding too.
  n_src = len(p2p.CLIPPromptTokens(sd.tokenizer).tokenize(SOURCES[1]))
  assert spec.alphas[1, 2] == 0 and spec.mapper[1][:, 2].sum() == 0
  assert spec.mapper[1][1, 1] == 1 and spec.mapper[1][2, 3] == 1
  assert spec.mapper[1][n_src, n_src + 1] == 1 and spec.alphas[1, n_src + 1] == 1
  np.testing.assert_array_equal(np.delete(spec.mapper[1].sum(0), 2), 1.0)
  with pytest.raises(ValueError, match="same number of words"):
    p2p.pipeline_edit_spec(sd.tokenizer, SOURCES[1:], EDITS[1:], kind="replace")
  with pytest.raises(ValueError, match="not a word"):
    p2p.pipeline_edit_spec(sd.tokenizer, SOURCES, EDITS, reweight={"cat": 2.0})


def test_without_replacement_it_is_plain_text_to_image(setup):
  sd, params, latents, run = setup
  images, z = run(0.0)
  ctx = encode_prompts(sd, params, SOURCES + EDITS)
  null = encode_prompts(sd, params, [""] * 4)
  ref_img, ref_z = make_text_to_image(sd)(
    params, jax.random.key(0), ctx, null, num_steps=STEPS, guidance=7.5, latents=np.concatenate([latents] * 2)
  )
  np.testing.assert_array_equal(z, np.asarray(ref_z))  # bit for bit (measured on CPU)
  np.testing.assert_array_equal(images, np.asarray(ref_img))
  assert np.abs(z[2:] - z[:2]).max() > 1e-3 * np.abs(z).max()  # the edits are other images


def test_replacement_changes_only_the_edits_and_follows_the_step_count(setup):
  _, _, _, run = setup
  _, free = run(0.0)
  _, full = run(1.0, 1.0)
  np.testing.assert_array_equal(full[:2], free[:2])  # the sources are never touched
  scale = np.abs(free).max()
  assert np.abs(full[2:] - free[2:]).max() > 1e-3 * scale
  # A fraction f replaces the first floor(f * 4) steps: 0.5 and 0.6 both replace two steps, 0.75 three.
  half = run(0.5)[1]
  np.testing.assert_array_equal(run(0.6)[1], half)
  assert np.abs(run(0.75)[1][2:] - half[2:]).max() > 1e-4 * scale
  assert p2p._sample._cache_size() == 1  # fractions are traced


def test_attention_of_the_edit_is_the_sources_in_the_imported_unet(tiny_loaded):
  """One guided U-Net call: after the control, every cross- and self-attention layer of the edit rows
  holds exactly the source rows' probabilities (identity word swap); the negative half is untouched."""
  sd, params = tiny_loaded
  spec = jax.tree.map(jnp.asarray, p2p.pipeline_edit_spec(sd.tokenizer, SOURCES[:1], EDITS[:1]))
  control = prompt_to_prompt_control(spec=spec, step=0, num_steps=4, cross_replace=1.0, self_replace=1.0)
  before, after = [], []
  spy = lambda into: lambda probs, info: into.append((info, probs)) or probs  # noqa: E731
  prompts = encode_prompts(sd, params, [SOURCES[0], EDITS[0]])
  ctx = jnp.concatenate([prompts, encode_prompts(sd, params, ["", ""])])
  z = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 8, 8, 4)), (4, 8, 8, 4))
  make_unet_fn(sd)(
    params, z, jnp.full((4,), 500), ctx, attention_control=chain_controls(spy(before), control, spy(after))
  )
  assert {info.is_cross for info, _ in after} == {True, False} and len(after) == len(before)
  for (info, old), (_, new) in zip(before, after, strict=True):
    np.testing.assert_array_equal(new[1], old[0], err_msg=info.layer)  # the edit row = the source row
    np.testing.assert_array_equal(new[np.array([0, 2, 3])], old[np.array([0, 2, 3])], err_msg=info.layer)
  # The edit's own cross-attention differed from the source's (so the check above can fail).
  assert max(float(jnp.abs(o[1] - o[0]).max()) for i, o in before if i.is_cross) > 1e-4


def test_errors(tiny_loaded, tiny_controlled, setup):
  sd, params = tiny_loaded
  edit = p2p.make_prompt_to_prompt(sd)
  with pytest.raises(ValueError, match="cross_replace"):
    edit(params, jax.random.key(0), SOURCES, EDITS, cross_replace=1.5)
  with pytest.raises(ValueError, match="latents must be"):
    edit(params, jax.random.key(0), SOURCES, EDITS, latents=np.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="ControlNet"):
    p2p.make_prompt_to_prompt(tiny_controlled[0])


def test_cli_sample_edit_prompt(tiny_sd, tiny_loaded, tmp_path, capsys):
  from diffjax.cli import main

  out = tmp_path / "p2p.npz"
  argv = ["sample", "--pretrained", tiny_sd.path, "--out", str(out), "--steps", str(STEPS), "--seed", "3"]
  for source, edit in zip(SOURCES, EDITS, strict=True):
    argv += ["--prompt", source, "--edit-prompt", edit]
  assert main([*argv, "--cross-replace", "0.5", "--self-replace", "0.25"]) == 0
  with np.load(out) as data:
    assert list(data["prompts"]) == SOURCES + EDITS
    assert data["images"].shape == (4, 16, 16, 3) and data["images"].dtype == np.uint8
    latents = data["latents"]
  assert (tmp_path / "p2p.png").is_file()
  sd, params = tiny_loaded  # the library call with the same seed
  _, z = p2p.make_prompt_to_prompt(sd)(
    params, jax.random.key(3), SOURCES, EDITS, num_steps=STEPS, cross_replace=0.5, self_replace=0.25
  )
  np.testing.assert_array_equal(latents, np.asarray(z))
  capsys.readouterr()
  for extra, message in (
    (["--edit-prompt", "a dog"], "once per --prompt"),
    (["--cross-replace", "1.5"], "--cross-replace must be in [0, 1]"),
    (["--num", "4"], "does not combine"),
  ):
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
  assert main(["sample", "--workdir", str(tmp_path), "--edit-prompt", "a"]) == 2
  assert "apply to --pretrained pipelines only" in capsys.readouterr().err
