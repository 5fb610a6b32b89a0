"""Stage runner and CLI: resumable halvings in one work directory, skipping, guided stages."""

import json
import os

import jax
import numpy as np
import pytest

from diffjax.checkpoints import Checkpointer
from diffjax.cli import main
from diffjax.config_files import apply_overrides, load_config
from diffjax.distillation import load_stage, run_distillation, stage_plan
from diffjax.training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, **overrides):
  c = load_config(os.path.join(ROOT, "configs", f"{name}.py:smoke"))
  return apply_overrides(c, {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("teacher"))
  train_and_evaluate(_config("digits_ddpm_v", **{"eval.every": 0, "sample.every": 0}), wd, progress=False)
  return wd


def _params(workdir, name):
  return jax.tree.leaves(load_stage(workdir, name)[2])


def test_stage_plan_halves_and_names_stages():
  c = load_config(os.path.join(ROOT, "configs", "digits_distill.py"))
  plan = stage_plan(c, num_timesteps=1000)
  assert [s.name for s in plan] == [f"stage_{n:03d}" for n in (32, 16, 8, 4, 2, 1)]
  assert [s.teacher for s in plan] == ["base"] + [s.name for s in plan[:-1]]
  g = stage_plan(load_config(os.path.join(ROOT, "configs", "digits_guided_distill.py")), num_timesteps=1000)
  assert [s.name for s in g] == ["stage_guided", "stage_032", "stage_016", "stage_008"]
  c.distill.end_steps = 3
  with pytest.raises(ValueError, match="power of two"):
    stage_plan(c, num_timesteps=1000)


def test_resume_mid_stage_is_bit_exact_and_a_finished_stage_is_skipped(teacher, tmp_path):
  cfg = _config("digits_distill", **{"sample.num": 0, "distill.start_steps": 2})  # one stage: 2 -> 1
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  out = run_distillation(cfg, teacher_workdir=teacher, workdir=straight, progress=False)
  assert [s["stage"] for s in out] == ["stage_001"] and not out[0]["skipped"] and out[0]["step"] == 4
  # Stopped after update 3, as if killed: the last checkpoint is at step 2, so update 3 is redone.
  out = run_distillation(cfg, teacher_workdir=teacher, workdir=resumed, progress=False, max_train_steps=3)
  assert out[-1]["interrupted"] and out[-1]["step"] == 3
  assert Checkpointer(os.path.join(resumed, "stage_001", "checkpoints")).latest_step() == 2
  out = run_distillation(cfg, teacher_workdir=teacher, workdir=resumed, progress=False)
  assert not out[0]["skipped"] and out[0]["step"] == 4
  for a, b in zip(_params(straight, "stage_001"), _params(resumed, "stage_001")):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(resumed, "stage_001", "metrics.jsonl")) as f:
    assert [json.loads(ln)["step"] for ln in f] == [2, 4]
  # Finished: a rerun restores and trains nothing.
  out = run_distillation(cfg, teacher_workdir=teacher, workdir=resumed, progress=False)
  assert out[0]["skipped"] and out[0]["loss"] > 0
  with open(os.path.join(resumed, "stage_001", "config.json")) as f:
    stage = json.load(f)["stage"]
  assert (
    stage["student_steps"] == 1 and stage["teacher"] == "base" and stage["forward_passes_per_sample"] == 1
  )


def test_cli_guided_distillation_smoke(teacher, tmp_path, capsys):
  wd, cfg = str(tmp_path / "guided"), os.path.join(ROOT, "configs", "digits_guided_distill.py:smoke")
  rc = main(
    [
      "distill",
      "--config",
      cfg,
      "--teacher",
      teacher,
      "--workdir",
      wd,
      "--no-progress",
      "--config.training.checkpoint_every=4",
    ]
  )
  assert rc == 0
  lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
  assert [r["stage"] for r in lines] == ["stage_guided", "stage_002"]
  assert all(np.isfinite(r["loss"]) for r in lines)
  for name in ("stage_guided", "stage_002"):
    assert os.path.exists(os.path.join(wd, name, "samples.png"))
  model, _, params, stage_cfg = load_stage(wd, "stage_002")
  assert model.guidance_embedding and "guidance_embedding" in params and stage_cfg.stage.student_steps == 2
  assert stage_cfg.stage.teacher == "stage_guided"
  # A rerun finds both stages finished and trains nothing.
  assert main(["distill", "--config", cfg, "--teacher", teacher, "--workdir", wd, "--no-progress"]) == 0
  assert all(json.loads(ln)["skipped"] for ln in capsys.readouterr().out.strip().splitlines())


def test_cli_refuses_an_eps_teacher_and_unknown_keys(teacher, tmp_path, capsys):
  cfg = os.path.join(ROOT, "configs", "digits_distill.py:smoke")
  eps = str(tmp_path / "eps_teacher")
  os.makedirs(eps)
  with open(os.path.join(teacher, "config.json")) as f:
    c = json.load(f)
  c["diffusion"]["prediction"] = "eps"
  with open(os.path.join(eps, "config.json"), "w") as f:
    json.dump(c, f)
  os.symlink(os.path.join(teacher, "checkpoints"), os.path.join(eps, "checkpoints"))
  assert main(["distill", "--config", cfg, "--teacher", eps, "--workdir", str(tmp_path / "w")]) == 2
  assert "v- or x0-prediction teacher" in capsys.readouterr().err
  assert (
    main(
      [
        "distill",
        "--config",
        cfg,
        "--teacher",
        teacher,
        "--workdir",
        str(tmp_path / "w"),
        "--config.distill.nope=1",
      ]
    )
    == 2
  )
  assert "unknown config key" in capsys.readouterr().err
