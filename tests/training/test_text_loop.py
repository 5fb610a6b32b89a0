"""Text-to-image training on the smoke config: trains, resumes, restores, and samples from the CLI."""

import json
import os

import numpy as np
import pytest

from diffjax import cli
from diffjax.config_files import load_config
from diffjax.training.text_builders import load_text_run
from diffjax.training.text_loop import grid_prompts, train_text_to_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "scenes_text.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("scenes_text"))
  last = train_text_to_image(load_config(CONFIG + ":smoke"), path, progress=False)
  assert last["step"] == 4 and np.isfinite(last["loss"])
  return path


def test_trains_and_resumes(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [2, 4]
  # Started again, the run restores step 4 and has nothing left to do (no step is compiled or run).
  assert train_text_to_image(load_config(CONFIG + ":smoke"), workdir, progress=False) == {}
  run = load_text_run(workdir)
  assert run.step == 4 and run.codec is None and run.sample_shape == (16, 32, 1)
  assert run.prompts.kind == "minilm" and not run.prompts.trainable


def test_grid_prompts_are_valid_scenes():
  prompts = grid_prompts(12)
  assert prompts[0] == "a 0 to the left of a 1" and len(set(prompts)) == 12


def test_cli_samples_prompts(workdir, tmp_path, capsys):
  out = str(tmp_path / "s.npz")
  argv = ["sample", "--workdir", workdir, "--prompt", "a 3 to the left of a 5", "--prompt", "an eight"]
  assert cli.main([*argv, "--guidance", "4", "--steps", "3", "--num", "3", "--out", out]) == 0
  with np.load(out) as data:
    assert data["images"].shape == (3, 16, 32, 1) and data["images"].dtype == np.uint8
    assert data["prompts"].tolist() == ["a 3 to the left of a 5", "an eight", "a 3 to the left of a 5"]
  assert os.path.isfile(out[:-4] + ".png")


@pytest.mark.parametrize(
  "extra, match",
  [
    (["--labels", "3"], "--labels apply to class-conditional models"),
    ([], "give --prompt"),
    (["--prompt", "a 3 to the left of a 5 and then a 7 to the right of a 9 and a 4"], "tokens long"),
  ],
)
def test_cli_errors_on_text_workdir(workdir, tmp_path, capsys, extra, match):
  assert cli.main(["sample", "--workdir", workdir, "--out", str(tmp_path / "s.npz"), *extra]) == 2
  assert match in capsys.readouterr().err


def test_cli_prompt_on_class_conditional_workdir(tmp_path, capsys):
  os.makedirs(tmp_path / "w")
  with open(tmp_path / "w" / "config.json", "w") as f:
    json.dump({"model": {"num_classes": 10}}, f)
  assert cli.main(["sample", "--workdir", str(tmp_path / "w"), "--prompt", "a 3"]) == 2
  assert "--prompt needs a text-to-image workdir" in capsys.readouterr().err
