"""The controlled model_fn: every sampler and classifier-free guidance run with control unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.control import control_cond, make_controlled_model_fn
from diffjax.guidance import classifier_free_guidance
from diffjax.models import UNet
from diffjax.models.controlnet import controlnet_params_from_unet
from diffjax.models.unet_controlnet import UNetControlNet
from diffjax.samplers import ddim_sample, ddpm_sample, dpm_solver_sample
from diffjax.schedules import make_schedule
from diffjax.training.step import make_model_fn

SCHEDULE = make_schedule("cosine", num_timesteps=20)


@pytest.fixture(scope="module")
def models():
  unet = UNet(
    block_out_channels=(8, 16), attention_head_dim=8, norm_num_groups=4, num_classes=3, layers_per_block=1
  )
  cn = UNetControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 8))
  x = jnp.zeros((4, 4, 4, 1))
  img = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))  # two embedder steps: 2x larger than x
  up = jax.jit(unet.init)(jax.random.key(0), x, jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))["params"]
  fresh = cn.init(jax.random.key(2), x, jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), img)["params"]
  params = {"base": up, "controlnet": controlnet_params_from_unet(fresh, up)}
  return unet, cn, params, img


def _samplers(model_fn, params, cond, key):
  x_T = jax.random.normal(key, (4, 4, 4, 1))
  common = {
    "model_fn": model_fn,
    "params": params,
    "schedule": SCHEDULE,
    "x_T": x_T,
    "key": key,
    "cond": cond,
  }
  return jnp.stack(
    [
      ddpm_sample(**common),
      ddim_sample(**common, num_steps=5, eta=0.5),
      dpm_solver_sample(**common, num_steps=5, spacing="trailing"),
    ]
  )


def test_fresh_controlnet_samples_exactly_like_the_base_with_every_sampler_and_cfg(models):
  unet, cn, params, img = models
  labels = jnp.array([0, 1, 2, 1])
  null = jnp.full((4,), 3)
  base_fn, ctrl_fn = make_model_fn(unet), make_controlled_model_fn(unet, cn)

  @jax.jit
  def run(params, key, w):
    plain = classifier_free_guidance(base_fn, guidance_scale=w, null_cond=null)
    guided = classifier_free_guidance(ctrl_fn, guidance_scale=w, null_cond=control_cond(null, img))
    return (
      _samplers(plain, params["base"], labels, key),
      _samplers(guided, params, control_cond(labels, img, jnp.array([1.0, 0.5, 0.0, 2.0])), key),
    )

  a, b = run(params, jax.random.key(3), jnp.array([1.0, 2.0, 3.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With a trained (here: perturbed) ControlNet the samples follow the control; scale 0 is the base.
  moved = {"base": params["base"], "controlnet": jax.tree.map(lambda p: p + 0.02, params["controlnet"])}
  c = jax.jit(
    lambda p, k: _samplers(ctrl_fn, p, control_cond(labels, img, jnp.array([0.0, 1.0, 1.0, 1.0])), k)
  )(moved, jax.random.key(3))
  ref = jax.jit(lambda p, k: _samplers(base_fn, p, labels, k))(params["base"], jax.random.key(3))
  np.testing.assert_allclose(c[:, 0], ref[:, 0], atol=1e-5)
  assert float(jnp.max(jnp.abs(c[:, 1:] - ref[:, 1:]))) > 1e-3


def test_errors(models):
  unet, cn, params, img = models
  fn = make_controlled_model_fn(unet, cn)
  x, t, y = jnp.zeros((4, 4, 4, 1)), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32)
  with pytest.raises(ValueError, match="controlnet_cond must have shape"):
    fn(params, x, t, control_cond(y, img[:, :4, :4]))
  with pytest.raises(ValueError, match="scale must be a scalar or shaped"):
    control_cond(y, img, jnp.ones(3))
  with pytest.raises(ValueError, match="image must be a"):
    control_cond(y, img[0])
  with pytest.raises(ValueError, match="cond of a controlled model"):
    fn(params, x, t, y)
  with pytest.raises(ValueError, match="params of a controlled model"):
    fn(params["base"], x, t, control_cond(y, img))
  with pytest.raises(ValueError, match="unet must be"):
    make_controlled_model_fn(cn, cn)
