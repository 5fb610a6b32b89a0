"""The command line: train then sample round trip, and one clear error per bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "digits_ddpm.py:smoke")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("cli") / "w")
  assert (
    main(
      [
        "train",
        "--config",
        SMOKE,
        "--workdir",
        wd,
        "--no-progress",
        "--config.training.num_steps=4",
        "--config.eval.every",
        "0",
      ]
    )
    == 0
  )
  return wd


def test_train_then_sample_round_trip(trained, tmp_path):
  out = str(tmp_path / "s.npz")
  assert (
    main(
      [
        "sample",
        "--workdir",
        trained,
        "--sampler",
        "ddim",
        "--steps",
        "5",
        "--guidance",
        "2.0",
        "--num",
        "6",
        "--labels",
        "3,3,7",
        "--out",
        out,
      ]
    )
    == 0
  )
  data = np.load(out)
  assert data["images"].dtype == np.uint8 and data["images"].shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(data["labels"], [3, 3, 7, 3, 3, 7])
  assert Image.open(out[:-4] + ".png").size[0] >= 8 * 3
  # DDPM sampler and the same seed give the same images twice.
  out2 = str(tmp_path / "d.npz")
  assert main(["sample", "--workdir", trained, "--sampler", "ddpm", "--num", "2", "--out", out2]) == 0
  assert main(["sample", "--workdir", trained, "--sampler", "ddpm", "--num", "2", "--out", out]) == 0
  np.testing.assert_array_equal(np.load(out2)["images"], np.load(out)["images"])


def test_sample_with_dpm_solver(trained, tmp_path):
  out = str(tmp_path / "p.npz")
  opts = ["--sampler", "dpm_solver++", "--steps", "4", "--num", "3", "--out", out]
  argv = ["sample", "--workdir", trained, *opts]
  assert main(argv) == 0
  images = np.load(out)["images"]
  assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)


@pytest.mark.parametrize(
  "argv_tail, needle",
  [
    (["--steps", "1000"], "num_steps must be in [1, 100]"),
    (["--labels", "3,10"], "label 10 is out of range [0, 10)"),
    (["--labels", "3,x"], "--labels must be comma-separated integers"),
    (["--eta", "2"], "--eta must be in [0, 1]"),
    (["--num", "0"], "--num must be >= 1"),
    (["--checkpoint-step", "77"], "--checkpoint-step 77 not found"),
  ],
)
def test_sample_bad_inputs(trained, tmp_path, capsys, argv_tail, needle):
  rc = main(["sample", "--workdir", trained, "--out", str(tmp_path / "x.npz"), *argv_tail])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_eval_reports_heldout_bits_per_dim_of_a_workdir(trained, tmp_path, capsys):
  judge, samples = str(tmp_path / "j.safetensors"), str(tmp_path / "s.npz")
  assert main(["train-judge", "--source", "digits", "--steps", "20", "--out", judge]) == 0
  assert main(["sample", "--workdir", trained, "--steps", "3", "--num", "20", "--out", samples]) == 0
  capsys.readouterr()
  argv = ["eval", "--samples", samples, "--judge", judge, "--workdir", trained, "--bpd-t-samples", "3"]
  assert main(argv) == 0
  first = json.loads(capsys.readouterr().out)
  assert first["workdir"] == trained and first["nll_t_samples"] == 3 and first["nll_num_examples"] > 1
  assert np.isfinite(first["nll_bits_per_dim"]) and 0.0 < first["nll_bits_per_dim"] < 100.0
  assert first["nll_bits_per_dim_stderr"] > 0.0 and "frechet_distance" in first
  assert main(argv) == 0  # The same seed gives the same bound.
  assert json.loads(capsys.readouterr().out)["nll_bits_per_dim"] == first["nll_bits_per_dim"]
  assert main([*argv, "--seed", "1"]) == 0
  assert json.loads(capsys.readouterr().out)["nll_bits_per_dim"] != first["nll_bits_per_dim"]
  assert main([*argv[:-1], "0"]) == 2
  assert "--bpd-t-samples must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["train", "--config", SMOKE, "--config.model.nope=1"], "unknown config key 'config.model.nope'"),
    (
      ["train", "--config", SMOKE, "--config.training.num_steps=abc"],
      "bad value for config.training.num_steps",
    ),
    (["train", "--config", "configs/nope.py"], "--config file 'configs/nope.py' does not exist"),
    (
      ["train", "--config", SMOKE, "--config.data.source=mnist_idx", "--config.data.path=/no/such/dir"],
      "/no/such/dir",
    ),
    (["train", "--config", SMOKE, "--config.sample.num_steps=500", "--config.sample.every=1"], "num_steps"),
    (["sample", "--workdir", "/no/such/workdir"], "has no config.json"),
  ],
)
def test_train_and_workdir_bad_inputs(tmp_path, capsys, argv, needle):
  argv = list(argv)
  if argv[0] == "train":
    argv += ["--workdir", str(tmp_path / "w"), "--no-progress"]
  rc = main(argv)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_image_of_wrong_rank_is_a_clear_error():
  from diffjax.data import validate_images

  with pytest.raises(ValueError, match=r"images must have rank 4"):
    validate_images(np.zeros((10, 28, 28), np.uint8))


def test_edit_png_with_mask_keeps_the_unmasked_half(trained, tmp_path):
  guide = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)
  Image.fromarray(guide).save(tmp_path / "g.png")
  mask = np.zeros((8, 8), np.uint8)
  mask[:, 4:] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  out = str(tmp_path / "e.npz")
  argv = ["edit", "--workdir", trained, "--image", str(tmp_path / "g.png"), "--strength", "0.5"]
  assert main([*argv, "--mask", str(tmp_path / "m.png"), "--num", "3", "--label", "7", "--out", out]) == 0
  data = np.load(out)
  assert data["images"].shape == (3, 8, 8, 1) and list(data["labels"]) == [7, 7, 7]
  np.testing.assert_array_equal(data["images"][:, :, :4, 0], np.broadcast_to(guide[:, :4], (3, 8, 4)))
  assert (data["images"][:, :, 4:] != data["guides"][:, :, 4:]).any()
  assert Image.open(out[:-4] + ".png").size[1] >= 16


@pytest.mark.parametrize(
  "extra, needle",
  [
    (["--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    (["--label", "12"], "--label must be in [0, 10), got 12"),
    (["--image", "/no/such.png"], "--image file '/no/such.png' does not exist"),
    (["--image", "WIDE"], "is 9x8 but the model makes 8x8"),
    (["--out", "x.png"], "--out must end with .npz"),
  ],
)
def test_edit_bad_inputs(trained, tmp_path, capsys, extra, needle):
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "g.png")
  Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "w.png")
  argv = ["edit", "--workdir", trained, "--image", str(tmp_path / "g.png"), "--out", str(tmp_path / "e.npz")]
  argv += [str(tmp_path / "w.png") if a == "WIDE" else a for a in extra]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1, err
