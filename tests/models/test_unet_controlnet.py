"""UNetControlNet (the class-conditional pixel U-Net's ControlNet): no-op at init, structure, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import UNet
from diffjax.models.controlnet import controlnet_params_from_unet
from diffjax.models.unet_controlnet import UNetControlNet


@pytest.fixture(scope="module")
def tiny():
  unet = UNet(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=4, num_classes=10)
  cn = UNetControlNet.from_unet(unet, conditioning_channels=2)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  img = jax.random.uniform(jax.random.key(1), (3, 8, 8, 2))
  t, y = jnp.array([0, 40, 999]), jnp.array([3, 7, 10])
  up = jax.jit(unet.init)(jax.random.key(2), x, t, y)["params"]
  fresh = jax.jit(cn.init)(jax.random.key(3), x, t, y, img)["params"]
  return unet, cn, up, controlnet_params_from_unet(fresh, up), (x, t, y, img)


def _controlled(unet, cn):
  @jax.jit
  def f(up, cp, x, t, y, img, scale):
    down, mid = cn.apply({"params": cp}, x, t, y, img, conditioning_scale=scale)
    return unet.apply(
      {"params": up}, x, t, y, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )

  return f


def test_fresh_controlnet_leaves_the_base_output_bitwise_unchanged(tiny):
  unet, cn, up, cp, (x, t, y, img) = tiny
  base = jax.jit(lambda p, x, t, y: unet.apply({"params": p}, x, t, y))(up, x, t, y)
  out = _controlled(unet, cn)(up, cp, x, t, y, img, 1.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
  # The encoder copy is the base's, and the new parts are where diffusers puts them.
  for name in ("conv_in", "time_embedding", "class_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
    jax.tree.map(np.testing.assert_array_equal, cp[name], up[name])
  extra = sorted(set(cp) - set(up))
  assert extra == [
    "controlnet_cond_embedding",
    *[f"controlnet_down_blocks_{j}" for j in range(6)],
    "controlnet_mid_block",
  ]
  # Trained (non-zero) zero convolutions move the output; scale 0 switches control off exactly.
  cp2 = jax.tree.map(lambda a: a + 0.05, cp)
  moved = _controlled(unet, cn)(up, cp2, x, t, y, img, 1.0)
  assert float(jnp.max(jnp.abs(moved - base))) > 1e-3
  off = _controlled(unet, cn)(up, cp2, x, t, y, img, jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(base[0]))
  np.testing.assert_array_equal(np.asarray(off[1]), np.asarray(moved[1]))


def test_errors(tiny):
  unet, cn, up, cp, (x, t, y, img) = tiny
  with pytest.raises(
    ValueError, match=r"controlnet_cond must have shape \[B, H\*1, W\*1, conditioning_channels\]"
  ):
    cn.apply({"params": cp}, x, t, y, img[:, :4])
  with pytest.raises(ValueError, match=r"= \(3, 8, 8, 2\) for x of shape \(3, 8, 8, 1\), got \(3, 8, 8, 1\)"):
    cn.apply({"params": cp}, x, t, y, img[..., :1])
  with pytest.raises(ValueError, match="controlnet_cond must be floating point"):
    cn.apply({"params": cp}, x, t, y, img.astype(jnp.int32))
  with pytest.raises(ValueError, match="label must have shape"):
    cn.apply({"params": cp}, x, t, y[:2], img)
  down, mid = cn.apply({"params": cp}, x, t, y, img)
  with pytest.raises(ValueError, match="mid_block_additional_residual has shape"):
    unet.apply(
      {"params": up}, x, t, y, down_block_additional_residuals=down, mid_block_additional_residual=down[0]
    )
  with pytest.raises(ValueError, match="guidance_embedding"):
    UNetControlNet.from_unet(UNet(guidance_embedding=True))
