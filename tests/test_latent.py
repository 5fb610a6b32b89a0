"""Latent diffusion wrappers: the loss and samplers run on latents of a (tiny, random) autoencoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.latent import (
  LatentCodec,
  channel_normalized,
  encode_images,
  latent_loss,
  latent_sampler,
  load_codec,
  save_codec,
)
from diffjax.losses import diffusion_loss
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.unet_condition import UNetCondition
from diffjax.samplers import ddim_sample
from diffjax.schedules import make_schedule
from diffjax.text_conditioning import make_text_model_fn


@pytest.fixture(scope="module")
def codec():
  vae = AutoencoderKL(
    in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4
  )
  params = vae.init(jax.random.key(0), jnp.zeros((1, 8, 16, 1)))["params"]
  return LatentCodec(module=vae, params=params, scaling_factor=0.7)


@pytest.fixture(scope="module")
def denoiser():
  unet = UNetCondition(
    in_channels=4, out_channels=4, block_out_channels=(8, 16), num_attention_heads=2, norm_num_groups=4
  )
  ctx = (jnp.ones((2, 3, 6)), jnp.ones((2, 3), jnp.int32))
  params = unet.init(jax.random.key(1), jnp.zeros((2, 4, 8, 4)), jnp.zeros(2), *ctx)["params"]
  return make_text_model_fn(unet), params, ctx


def test_codec_shapes_and_scaling(codec):
  x = jax.random.uniform(jax.random.key(2), (3, 8, 16, 1), minval=-1, maxval=1)
  z = codec.encode(x)
  assert z.shape == (3, 4, 8, 4) == (3, *codec.latent_shape((8, 16, 1)))
  raw = codec.module.apply({"params": codec.params}, x, method=codec.module.encode).mode()
  np.testing.assert_allclose(z, 0.7 * raw, rtol=1e-6)
  assert codec.decode(z).shape == (3, 8, 16, 1)
  with pytest.raises(ValueError, match="divisible"):
    codec.latent_shape((7, 16, 1))


def test_encode_images_pads_the_last_batch(codec):
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 16, 1), dtype=np.uint8)
  z = encode_images(codec, images, batch_size=2)
  ref = codec.encode(jnp.asarray(images, jnp.float32) / 127.5 - 1)
  np.testing.assert_allclose(z, ref, atol=1e-5)


def test_latent_loss_trains_the_denoiser(codec, denoiser):
  model_fn, params, cond = denoiser
  schedule = make_schedule("linear", num_timesteps=100)
  loss = latent_loss(diffusion_loss, codec=codec)
  images = jax.random.uniform(jax.random.key(3), (2, 8, 16, 1), minval=-1, maxval=1)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt):
    value, grads = jax.value_and_grad(
      lambda q: loss(
        x0=images, key=jax.random.key(4), model_fn=model_fn, params=q, schedule=schedule, cond=cond
      )[0]
    )(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value

  opt = tx.init(params)
  losses = []
  for _ in range(5):
    params, opt, value = step(params, opt)
    losses.append(float(value))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_latent_sampler_returns_decoded_images(codec, denoiser):
  model_fn, params, cond = denoiser
  schedule = make_schedule("linear", num_timesteps=50)
  sample = latent_sampler(ddim_sample, codec=codec)
  x_T = jax.random.normal(jax.random.key(5), (2, 4, 8, 4))
  images = sample(
    model_fn=model_fn,
    params=params,
    schedule=schedule,
    x_T=x_T,
    key=jax.random.key(6),
    cond=cond,
    num_steps=3,
  )
  assert images.shape == (2, 8, 16, 1) and bool(jnp.isfinite(images).all())


def test_channel_normalized_standardises_each_channel(codec):
  images = np.random.default_rng(1).integers(0, 256, (6, 8, 16, 1), dtype=np.uint8)
  normed = channel_normalized(codec, images)
  assert len(normed.scaling_factor) == len(normed.shift_factor) == 4
  z = encode_images(normed, images)
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
  np.testing.assert_allclose(
    normed.decode(z), codec.decode(codec.encode(jnp.asarray(images) / 127.5 - 1)), atol=1e-4
  )


@pytest.mark.parametrize("per_channel", [False, True])
def test_save_and_load_codec(codec, tmp_path, per_channel):
  if per_channel:
    codec = codec.replace(scaling_factor=(1.0, 2.0, 0.5, 1.5), shift_factor=(0.1, -0.2, 0.3, 0.0))
  save_codec(str(tmp_path), codec, source="test")
  loaded = load_codec(str(tmp_path))
  assert loaded.module == codec.module and loaded.scaling_factor == codec.scaling_factor
  assert loaded.shift_factor == codec.shift_factor
  z = jnp.ones((1, 4, 8, 4))
  np.testing.assert_allclose(loaded.decode(z), codec.decode(z), atol=1e-6)
  with pytest.raises(FileNotFoundError, match="autoencoder"):
    load_codec(str(tmp_path / "missing"))
