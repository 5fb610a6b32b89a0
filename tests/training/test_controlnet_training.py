"""ControlNet and noisy-classifier training end to end on smoke configs: frozen base, resume, restore, CLI."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffjax.cli import main as cli_main
from diffjax.config_files import apply_overrides, load_config
from diffjax.data import ImageDataset
from diffjax.training.aux_loop import fit, restore_state
from diffjax.training.classifier_run import load_classifier
from diffjax.training.controlnet_run import load_controlnet
from diffjax.training.loop import train_and_evaluate
from diffjax.training.restore import load_trained
from diffjax.training.state import create_train_state
from diffjax.training.workdir import read_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, **overrides):
  c = load_config(os.path.join(ROOT, "configs", f"{name}.py:smoke"))
  return apply_overrides(c, {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("base"))
  small = {"model.attention_levels": "(False, False)", "model.block_out_channels": "(8, 16)"}
  cfg = _config("digits_ddpm", **small, **{"training.num_steps": 3, "eval.every": 0})
  train_and_evaluate(cfg, wd, progress=False)
  return wd


def _lines(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def test_controlnet_trains_only_its_own_parameters_and_resumes(base_workdir, tmp_path, capsys):
  wd = str(tmp_path / "cn")
  args = [
    "train-controlnet",
    "--config",
    os.path.join(ROOT, "configs", "mnist_controlnet.py:smoke"),
    "--workdir",
    wd,
  ]
  args += [f"--config.base.workdir={base_workdir}", "--no-progress", "--config.training.num_steps=2"]
  assert cli_main(args) == 0  # (resuming is the shared loop's, tested below on a toy model)
  assert [r["step"] for r in _lines(wd) if "loss" in r] == [2]
  evals = [r for r in _lines(wd) if "eval_eps_mse_controlled" in r]
  assert len(evals) == 1 and all(np.isfinite(r["eval_eps_mse_controlled"]) for r in evals)
  run = load_controlnet(wd)
  base = load_trained(read_config(base_workdir), base_workdir)[2]
  for a, b in zip(jax.tree.leaves(run.params["base"]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  assert set(run.params["controlnet"]) == set(base) - {
    "up_blocks_0",
    "up_blocks_1",
    "conv_norm_out",
    "conv_out",
  } | {
    "controlnet_cond_embedding",
    "controlnet_mid_block",
    *[f"controlnet_down_blocks_{j}" for j in range(4)],
  }
  # Trained: the zero convolutions have moved away from zero.
  assert float(np.abs(run.params["controlnet"]["controlnet_mid_block"]["kernel"]).max()) > 0
  assert run.control_fn(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 8, 8, 1)
  assert (
    cli_main(
      [
        "train-controlnet",
        "--config",
        os.path.join(ROOT, "configs", "mnist_classifier.py:smoke"),
        "--workdir",
        wd,
      ]
    )
    == 2
  )
  assert "not a ControlNet config" in capsys.readouterr().err


def test_classifier_trains_and_restores(tmp_path):
  wd = str(tmp_path / "clf")
  args = [
    "train-classifier",
    "--config",
    os.path.join(ROOT, "configs", "mnist_classifier.py:smoke"),
    "--workdir",
    wd,
  ]
  small = ["--config.model.attention_levels=(False, False)", "--config.model.block_out_channels=(8, 16)"]
  assert cli_main([*args, *small, "--no-progress"]) == 0
  rows = _lines(wd)
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert {"eval_acc_t0", "eval_acc_t50"} <= set(rows[-1])
  classifier, schedule, params, config = load_classifier(wd)
  assert schedule.num_timesteps == 100 and classifier.num_classes == 10
  logits = classifier.apply({"params": params}, np.zeros((3, 8, 8, 1), np.float32), np.array([0, 5, 99]))
  assert logits.shape == (3, 10)


def test_aux_loop_resumes_exactly(tmp_path):
  """Stopped at step 2 and restarted, the shared loop ends where one uninterrupted run ends."""
  rng = np.random.default_rng(0)
  ds = ImageDataset(
    images=rng.integers(0, 256, (16, 2, 2, 1), dtype=np.uint8),
    labels=np.zeros(16, np.int32),
    num_classes=1,
    name="toy",
  )
  tx = optax.sgd(0.1)

  def config(num_steps):
    return ml_collections.ConfigDict(
      dict(
        seed=0,
        training=dict(batch_size=4, num_steps=num_steps, log_every=1, checkpoint_every=1, keep_checkpoints=2),
        eval=dict(every=0),
      )
    )

  @jax.jit
  def step(state, batch, key):
    noise = jax.random.normal(jax.random.fold_in(key, state.step), ())

    def loss_fn(p):
      return jnp.mean((batch["image"] - p["w"]) ** 2) + noise * p["w"]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    state = state.replace(step=state.step + 1, params=params, ema_params=params)
    return state, {"loss": loss, "skipped": state.skipped}

  def init():
    return create_train_state(params={"w": jnp.zeros(())}, tx=tx)

  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  fit(config=config(4), workdir=whole, init_state=init, step_fn=step, train_ds=ds, progress=False)
  fit(config=config(2), workdir=parts, init_state=init, step_fn=step, train_ds=ds, progress=False)
  fit(config=config(4), workdir=parts, init_state=init, step_fn=step, train_ds=ds, progress=False)
  a, b = restore_state(whole, init()), restore_state(parts, init())
  assert int(a.step) == int(b.step) == 4
  np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
  assert [r["step"] for r in _lines(parts) if "loss" in r] == [1, 2, 3, 4]
