"""Autoencoder training: loss terms, the jitted step (with and without GAN/perceptual terms), the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.config_files import apply_overrides, load_config
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.training.autoencoder_main import main as autoencoder_main
from diffjax.training.autoencoder_step import (
  PatchDiscriminator,
  _last_layer_grad,
  make_autoencoder_optimizer,
  make_autoencoder_train_step,
  make_judge_perceptual,
  psnr,
)
from diffjax.training.state import create_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _init_like_flax(shapes, seed=0):
  """LeCun-normal kernels, zero biases, unit GroupNorm scales, without compiling ``init``."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), jnp.float32)
    return jnp.ones(s.shape) if name == "scale" else jnp.zeros(s.shape)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _images(n=4, size=8, seed=0):
  # Smooth blobs in [-1, 1]: learnable within a few steps.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1))
  return jnp.asarray(2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 20)[..., None] - 1, jnp.float32)


def test_last_layer_grad_matches_autodiff():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  d = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)

  def f(k):
    out = jax.lax.conv_general_dilated(
      h, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(out * d)

  np.testing.assert_allclose(_last_layer_grad(h, k, d), jax.grad(f)(k), rtol=1e-5, atol=1e-5)


def test_psnr_and_judge_perceptual():
  x = _images()
  x = 0.9 * x
  np.testing.assert_allclose(psnr(x, x + 0.02), 10 * np.log10(4 / 0.02**2), rtol=1e-4)
  assert float(psnr(x, x + 5.0).max()) > 10 * np.log10(4 / 5.0**2)  # reconstructions are clipped
  judge = {
    "conv1": {"kernel": jnp.ones((3, 3, 1, 4)) * jnp.arange(1.0, 5.0) - 2.5, "bias": jnp.zeros(4)},
    "conv2": {"kernel": jnp.ones((3, 3, 4, 2)), "bias": jnp.zeros(2)},
  }
  dist = make_judge_perceptual(judge)
  np.testing.assert_allclose(dist(x, x), 0.0, atol=1e-6)
  assert float(jnp.min(dist(x, _images(seed=1)))) > 0.0


def _state_and_step(*, gan: bool, perceptual: bool):
  vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
  x0 = jnp.zeros((1, 8, 8, 1))
  params = {"vae": _init_like_flax(jax.eval_shape(vae.init, jax.random.key(0), x0)["params"])}
  disc = None
  if gan:
    disc = PatchDiscriminator(base_channels=8, num_layers=1)
    params["disc"] = _init_like_flax(jax.eval_shape(disc.init, jax.random.key(0), x0)["params"], seed=1)
  opt = make_optimizer(learning_rate=3e-3, grad_clip=None)
  tx = make_autoencoder_optimizer(opt, opt if gan else None)
  judge = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}}
  judge["conv2"] = {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.zeros(2)}
  step = make_autoencoder_train_step(
    model=vae,
    tx=tx,
    discriminator=disc,
    kl_weight=1e-3,
    perceptual_fn=make_judge_perceptual(judge) if perceptual else None,
    perceptual_weight=0.1 if perceptual else 0.0,
    disc_start=2,
  )
  return create_train_state(params=params, tx=tx), jax.jit(step)


def test_train_step_with_all_terms_decreases_reconstruction_loss():
  # The plain step (no discriminator, no perceptual term) runs in test_train_resume_and_load.
  gan = True
  state, step = _state_and_step(gan=gan, perceptual=gan)
  batch, key = {"image": _images()}, jax.random.key(0, impl="rbg")
  history = []
  for _ in range(10):
    state, m = step(state, batch, key)
    history.append(jax.device_get(m))
  assert int(state.step) == 10 and int(history[-1]["skipped"]) == 0
  assert all(np.isfinite(h["loss"]) for h in history)
  assert np.mean([h["rec"] for h in history[-3:]]) < 0.8 * np.mean([h["rec"] for h in history[:3]])
  if gan:
    assert float(history[0]["adv_weight"]) == 0.0  # before disc_start
    assert float(history[-1]["adv_weight"]) > 0.0 and np.isfinite(history[-1]["d_loss"])


def test_perceptual_weight_needs_a_function():
  with pytest.raises(ValueError, match="perceptual_fn"):
    make_autoencoder_train_step(
      model=AutoencoderKL(), tx=make_optimizer(learning_rate=1e-3), perceptual_weight=1.0
    )


def _config(**overrides):
  c = load_config(os.path.join(ROOT, "configs", "mnist_autoencoder.py:smoke"))
  # The embedded 8x8 digits: no data files, f = 2 -> 4x4x4 latents.
  base = {"data.source": "digits", "data.pad_to": "None", "data.holdout": "16", "eval.crop": "None"}
  return apply_overrides(c, {**base, **{k: str(v) for k, v in overrides.items()}})


def test_train_resume_and_load(tmp_path):
  import shutil

  from diffjax.training.autoencoder_loop import train_autoencoder
  from diffjax.training.autoencoder_restore import load_autoencoder

  wd = str(tmp_path / "ae")
  cfg = _config(**{"training.num_steps": 4, "training.checkpoint_every": 2})
  last = train_autoencoder(cfg, wd, progress=False)
  assert np.isfinite(last["heldout_psnr"])
  with open(os.path.join(wd, "latent_stats.json")) as f:
    stats = json.load(f)
  assert stats["step"] == 4 and stats["latent_shape"] == [4, 4, 4] and stats["params"] == "ema"
  module, straight, scaling = load_autoencoder(wd)
  assert scaling == pytest.approx(stats["scaling_factor"]) and scaling > 0
  assert module.latent_channels == 4 and "decoder" in straight
  assert os.path.exists(os.path.join(wd, "reconstructions.png"))

  # Interrupted after step 2: the restart resumes there and ends with the same parameters.
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  with pytest.raises(ValueError, match="computed for step 4"):
    load_autoencoder(wd)
  train_autoencoder(cfg, wd, progress=False)
  _, resumed, _ = load_autoencoder(wd)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "loss" in line]
  assert steps == [2, 4]


def test_main_rejects_unknown_override(tmp_path, capsys):
  args = ["--config", os.path.join(ROOT, "configs", "mnist_autoencoder.py:smoke"), "--workdir", str(tmp_path)]
  assert autoencoder_main([*args, "--config.training.nope=1"]) == 2
  assert "unknown config key" in capsys.readouterr().err
