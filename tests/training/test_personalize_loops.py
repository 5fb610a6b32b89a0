"""DreamBooth and FastComposer runs on a tiny untrained base: train, resume, restore, sample."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.checkpoints import Checkpointer
from diffjax.config_files import load_config
from diffjax.personalization.subjects import digit_word_positions
from diffjax.training import personalize_main
from diffjax.training.dreambooth_loop import load_dreambooth, scene_prompts, train_dreambooth
from diffjax.training.text_builders import build_text_run, load_text_run
from diffjax.training.workdir import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name):
  return load_config(os.path.join(ROOT, "configs", name))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A text-to-image work directory holding an initialised (untrained) tiny model at step 0."""
  path = str(tmp_path_factory.mktemp("base"))
  config = _config("scenes_text.py:smoke")
  config.model.update(block_out_channels=(8,), cross_attention_levels=(True,), num_attention_heads=2, norm_num_groups=4)
  write_config(path, config)
  _, state = build_text_run(config, workdir=path)
  ckpt = Checkpointer(os.path.join(path, "checkpoints"))
  ckpt.save(0, state, force=True)
  ckpt.close()
  return path


def test_dreambooth_trains_resumes_and_restores(base, tmp_path):
  config = _config("dreambooth.py:smoke")
  config.base_workdir = base
  workdir = str(tmp_path / "db")
  last = train_dreambooth(config, workdir, progress=False)
  assert last["step"] == 3 and np.isfinite(last["loss"]) and last["prior_loss"] > 0
  assert last["class_images_s"] > 0 and last["steps_run"] == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  cached = [n for n in os.listdir(workdir) if n.startswith("class_images_")]
  assert len(cached) == 1
  again = train_dreambooth(config, workdir, progress=False)  # resumes at step 3: nothing to run
  assert again["steps_run"] == 0 and again["class_images_s"] == 0.0  # class images come from the cache
  run, subject = load_dreambooth(workdir)
  base_run = load_text_run(base)
  assert run.step == 3 and subject.label == 3 and subject.references.shape == (3, 8, 8, 1)
  assert subject.scenes.shape == (3, 16, 32, 1) and all(
    "bwv 3" in p or "bwv three" in p for p in subject.prompts
  )
  diffs = jax.tree.leaves(
    jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), run.params, base_run.params)
  )
  assert max(diffs) > 0


def test_scene_prompts_name_the_class_without_the_identifier():
  prompts, others, sides, templates = scene_prompts(4, 6, seed=0)
  assert len(prompts) == 6 and all(("4" in p or "four" in p) and "bwv" not in p for p in prompts)
  assert others.shape == sides.shape == templates.shape == (6,)
  with_id = scene_prompts(4, 6, seed=0, identifier="bwv")
  assert [p.replace("bwv ", "") for p in with_id[0]] == prompts and np.array_equal(with_id[2], sides)


def test_cli_rejects_an_unknown_method(tmp_path, capsys):
  cfg = tmp_path / "c.py"
  cfg.write_text(
    "import ml_collections\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({'method': 'x'})\n"
  )
  assert personalize_main.main(["--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2
  assert "config.method='x' is not one of" in capsys.readouterr().err


def test_fastcomposer_trains_restores_and_samples_with_delay(base, tmp_path):
  from diffjax.training.fastcomposer_loop import load_fastcomposer, train_fastcomposer

  config = _config("fastcomposer.py:smoke")
  config.base_workdir = base
  workdir = str(tmp_path / "fc")
  last = train_fastcomposer(config, workdir, progress=False)
  assert last["step"] == 3 and np.isfinite(last["loss"]) and np.isfinite(last["localization_loss"])
  assert last["loss"] == pytest.approx(last["denoise_loss"] + 0.05 * last["localization_loss"], rel=1e-4)
  run = load_fastcomposer(workdir)
  assert run.step == 3 and run.ref_shape == (8, 8, 1) and set(run.params) == {"unet", "encoder", "fuser"}
  prompts = ["a 3 to the left of a 5", "a five to the right of a three"]
  cond = run.base.prompts.encode(prompts)
  positions = digit_word_positions(run.base.prompts.tokenizer, prompts)
  refs = jax.random.uniform(jax.random.key(0), (2, 2, 8, 8, 1), minval=-1.0, maxval=1.0)
  generate = run.generate()
  key = jax.random.key(1)

  def sample(valid, delay):
    return np.asarray(
      generate(run.params, key, cond, refs, positions, valid, num_steps=3, guidance=2.0, delay=delay)
    )

  on = np.ones((2, 2), np.float32)
  subject = sample(on, 0.0)
  text_only = sample(on, 1.0)  # delayed through every step: never sees the subjects
  assert subject.shape == (2, 16, 32, 1) and np.all(np.isfinite(subject))
  np.testing.assert_array_equal(text_only, sample(np.zeros_like(on), 0.0))
  assert np.max(np.abs(subject - text_only)) > 0
  with pytest.raises(ValueError, match="delay must be a fraction"):
    generate(run.params, key, cond, refs, positions, on, num_steps=3, delay=1.5)
