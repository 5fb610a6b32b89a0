"""``python -m diffjax sample --pretrained DIR``: text-to-image, img2img and ControlNet on the tiny pipeline.

Batches of two prompts, so the compiled samplers of the other tests in this directory are reused.
"""

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax.cli import main
from diffjax.pretrained.pipeline import encode_prompts, make_text_to_image

PROMPTS = ["a cat and a dog sitting on the sofa", "a watercolor landscape of mountains"]


def _args(path, out, *extra):
  return [
    "sample",
    "--pretrained",
    path,
    "--prompt",
    PROMPTS[0],
    "--prompt",
    PROMPTS[1],
    "--out",
    str(out),
    *extra,
  ]


@pytest.fixture(scope="module")
def guide_png(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "guide.png"
  rng = np.random.default_rng(7)
  Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)  # resized to 16x16
  return str(path)


def test_text_to_image(tiny_sd, tiny_loaded, tmp_path):
  out = tmp_path / "s.npz"
  assert main(_args(tiny_sd.path, out, "--steps", "5", "--guidance", "7.5", "--seed", "3")) == 0
  with np.load(out) as data:
    images, latents = data["images"], data["latents"]
    assert list(data["prompts"]) == PROMPTS
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert (tmp_path / "s.png").is_file()
  sd, params = tiny_loaded  # the library with the same seed gives the same latents
  ctx, null = encode_prompts(sd, params, PROMPTS), encode_prompts(sd, params, ["", ""])
  _, z = make_text_to_image(sd)(params, jax.random.key(3), ctx, null, num_steps=5, guidance=7.5)
  np.testing.assert_array_equal(latents, np.asarray(z))


def test_img2img_and_controlnet(tiny_sd, guide_png, tmp_path):
  out = tmp_path / "e.npz"
  assert main(_args(tiny_sd.path, out, "--image", guide_png, "--strength", "0.6", "--steps", "10")) == 0
  with np.load(out) as data:
    assert data["images"].shape == (2, 16, 16, 3)
  out = tmp_path / "c.npz"
  extra = ("--controlnet", tiny_sd.controlnet_path, "--control-image", guide_png, "--controlnet-scale", "0.8")
  assert main(_args(tiny_sd.path, out, "--steps", "5", *extra)) == 0
  with np.load(out) as data:
    assert data["images"].shape == (2, 16, 16, 3)


@pytest.mark.parametrize(
  "extra, message",
  [
    (("--workdir", "w"), "not both"),
    (("--spacing", "trailing"), "--spacing does not apply"),
    (("--sampler", "ddpm"), "DDIM"),
    (("--image", "missing.png"), "does not exist"),
    (("--control-image", "c.png"), "go together"),
    (("--image", "x.png", "--strength", "1.5"), "--strength"),
  ],
)
def test_errors(tiny_sd, tmp_path, capsys, extra, message):
  assert main(_args(tiny_sd.path, tmp_path / "s.npz", *extra)) == 2
  assert message in capsys.readouterr().err


def test_error_for_a_missing_directory_and_workdir_only_flags(tmp_path, capsys):
  assert (
    main(
      ["sample", "--pretrained", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "s.npz")]
    )
    == 2
  )
  assert "does not exist" in capsys.readouterr().err
  assert main(["sample", "--workdir", str(tmp_path), "--image", "a.png"]) == 2
  assert "apply to --pretrained pipelines only" in capsys.readouterr().err
