"""Workdir-level tests: resume, checkpoints, metrics, TFDS under mock data."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

from diffjax.checkpoints import Checkpointer
from diffjax.config_files import apply_overrides, load_config
from diffjax.training.builders import lr_schedule_change
from diffjax.training.loop import train_and_evaluate
from diffjax.training.restore import load_trained
from diffjax.training.workdir import read_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name="digits_ddpm", **overrides):
  c = load_config(os.path.join(ROOT, "configs", f"{name}.py:smoke"))
  return apply_overrides(c, {k: str(v) for k, v in overrides.items()})


def _params(workdir):
  return load_trained(read_config(workdir), workdir, ema=False)[2]


def test_resume_continues_the_same_run(tmp_path):
  # constant LR so that a shorter first run follows the same trajectory as the long one.
  common = {"training.lr_decay": "constant", "training.checkpoint_every": 3, "eval.every": 0}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_and_evaluate(_config(**common, **{"training.num_steps": 6}), straight, progress=False)
  train_and_evaluate(_config(**common, **{"training.num_steps": 3}), resumed, progress=False)
  assert Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 3
  with warnings.catch_warnings(record=True) as caught:  # constant rate: num_steps may change freely
    warnings.simplefilter("always")
    train_and_evaluate(_config(**common, **{"training.num_steps": 6}), resumed, progress=False)
  assert not [w for w in caught if "learning-rate schedule" in str(w.message)]
  a, b = _params(straight), _params(resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  steps = [r["step"] for r in map(json.loads, open(os.path.join(resumed, "metrics.jsonl"))) if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 6
  # A run started again after it finished restores and does nothing more.
  train_and_evaluate(_config(**common, **{"training.num_steps": 6}), resumed, progress=False)
  assert Checkpointer(os.path.join(resumed, "checkpoints")).latest_step() == 6
  # Resuming under a schedule that gives another rate at the resume step says so.
  with pytest.warns(RuntimeWarning, match=r"training.lr_decay 'constant' -> 'cosine'"):
    train_and_evaluate(
      _config(**{**common, "training.lr_decay": "cosine", "training.num_steps": 6}), resumed, progress=False
    )


def test_lr_schedule_change_names_the_settings_and_both_rates():
  base = {"training.lr_decay": "cosine", "training.learning_rate": 4e-4, "training.warmup_steps": 100}
  old = _config(**base, **{"training.num_steps": 9000})
  assert lr_schedule_change(old, old, step=6000) is None
  msg = lr_schedule_change(old, _config(**base, **{"training.num_steps": 12000}), step=9000)
  assert "training.num_steps 9000 -> 12000" in msg and "4e-05" in msg  # cosine ends at 0.1x the peak
  const = {"training.lr_decay": "constant", "training.learning_rate": 1e-4, "training.warmup_steps": 0}
  a, b = _config(**const, **{"training.num_steps": 9000}), _config(**const, **{"training.num_steps": 20000})
  assert lr_schedule_change(a, b, step=9000) is None


def test_partial_checkpoint_never_replaces_a_good_one(tmp_path):
  wd = str(tmp_path / "w")
  cfg = _config(**{"training.num_steps": 3, "eval.every": 0})
  train_and_evaluate(cfg, wd, progress=False)
  ck = os.path.join(wd, "checkpoints")
  good = _params(wd)
  # An interrupted save leaves only orbax's temporary directory (no commit marker).
  partial = os.path.join(ck, "9.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(ck, "3"), partial)
  shutil.rmtree(os.path.join(partial, "default"))
  assert Checkpointer(ck).latest_step() == 3
  for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(_params(wd))):
    np.testing.assert_array_equal(x, y)


def test_workdir_contents_and_checkpoint_retention(tmp_path):
  wd = str(tmp_path / "w")
  cfg = _config(
    **{
      "training.num_steps": 8,
      "training.checkpoint_every": 2,
      "training.keep_checkpoints": 2,
      "sample.every": 8,
      "eval.every": 4,
    }
  )
  out = train_and_evaluate(cfg, wd, progress=False)
  assert sorted(Checkpointer(os.path.join(wd, "checkpoints")).all_steps()) == [6, 8]
  assert read_config(wd).training.num_steps == 8
  recs = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
  bpd = [r["eval_bpd"] for r in recs if "eval_bpd" in r]
  assert len(bpd) == 3 and all(np.isfinite(bpd))
  assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in recs if "loss" in r)
  assert os.path.exists(out["sample_grid"]) and out["sample_grid"].endswith(".png")


def test_tfds_cifar10_config_trains_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _config("cifar10_ddpm", **{"training.num_steps": 2, "eval.every": 0, "training.batch_size": 8})
  with tfds.testing.mock_data(num_examples=40):
    out = train_and_evaluate(cfg, str(tmp_path / "c"), progress=False)
  assert out["step"] == 2 and np.isfinite(out["loss"])


def test_mismatched_classes_and_shape_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="num_classes"):
    train_and_evaluate(_config(**{"model.num_classes": 5}), str(tmp_path / "a"), progress=False)
  with pytest.raises(ValueError, match="image_shape"):
    train_and_evaluate(_config(**{"data.image_shape": "(16, 16, 1)"}), str(tmp_path / "b"), progress=False)
