"""The controlled model_fn: every sampler and classifier-free guidance run with control unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.control import control_cond, make_controlled_model_fn
from diffjax.guidance import classifier_free_guidance
from diffjax.samplers import ddim_sample, ddpm_sample, dpm_solver_sample
from diffjax.schedules import make_schedule
from diffjax.training.step import make_model_fn
from tests.tiny_controlnet import IMAGE_SHAPE, X_SHAPE, tiny_controlnet

SCHEDULE = make_schedule("cosine", num_timesteps=10)


def test_fresh_controlnet_samples_exactly_like_the_base_with_every_sampler_and_cfg():
  unet, cn, up, cp = tiny_controlnet()
  img = jax.random.uniform(jax.random.key(1), (4, *IMAGE_SHAPE))
  labels, null = jnp.array([0, 1, 2, 1]), jnp.full((4,), 3)
  base_fn, ctrl_fn = make_model_fn(unet), make_controlled_model_fn(unet, cn)

  @jax.jit
  def run(up, cp, key, w, scale):
    x_T = jax.random.normal(key, (4, *X_SHAPE))
    plain = classifier_free_guidance(base_fn, guidance_scale=w, null_cond=null)
    guided = classifier_free_guidance(ctrl_fn, guidance_scale=w, null_cond=control_cond(null, img))
    params = {"base": up, "controlnet": cp}
    out = []
    for fn, p, cond in ((plain, up, labels), (guided, params, control_cond(labels, img, scale))):
      common = {"model_fn": fn, "params": p, "schedule": SCHEDULE, "x_T": x_T, "key": key, "cond": cond}
      out.append(
        jnp.stack(
          [
            ddpm_sample(**common),
            ddim_sample(**common, num_steps=4, eta=0.5),
            dpm_solver_sample(**common, num_steps=4),
          ]
        )
      )
    return out

  key, w, scale = jax.random.key(3), jnp.array([1.0, 2.0, 3.0, 0.0]), jnp.array([1.0, 0.5, 0.0, 2.0])
  a, b = run(up, cp, key, w, scale)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A trained (here: perturbed) ControlNet changes every sample (under at least one sampler: the tiny
  # model's samples saturate at the clipping bounds), except where the scale is 0.
  a, c = run(up, jax.tree.map(lambda p: p + 0.02, cp), key, w, jnp.array([0.0, 1.0, 1.0, 1.0]))
  np.testing.assert_allclose(c[:, 0], a[:, 0], atol=1e-5)
  assert float(jnp.min(jnp.max(jnp.abs(c[:, 1:] - a[:, 1:]), axis=(0, 2, 3, 4)))) > 1e-3


def test_errors():
  unet, cn, up, cp = tiny_controlnet()
  params = {"base": up, "controlnet": cp}
  fn = make_controlled_model_fn(unet, cn)
  x, t, y = jnp.zeros((4, *X_SHAPE)), jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32)
  img = jnp.zeros((4, *IMAGE_SHAPE))
  with pytest.raises(ValueError, match="controlnet_cond must have shape"):
    jax.eval_shape(fn, params, x, t, control_cond(y, img[:, :4, :4]))
  with pytest.raises(ValueError, match="scale must be a scalar or shaped"):
    control_cond(y, img, jnp.ones(3))
  with pytest.raises(ValueError, match="image must be a"):
    control_cond(y, img[0])
  with pytest.raises(ValueError, match="cond of a controlled model"):
    fn(params, x, t, y)
  with pytest.raises(ValueError, match="params of a controlled model"):
    fn(up, x, t, control_cond(y, img))
  with pytest.raises(ValueError, match="unet must be"):
    make_controlled_model_fn(cn, cn)
