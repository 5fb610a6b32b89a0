"""UNetControlNet (the class-conditional pixel U-Net's ControlNet): no-op at init, structure, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import UNet
from diffjax.models.unet_controlnet import UNetControlNet
from tests.tiny_controlnet import IMAGE_SHAPE, X_SHAPE, tiny_controlnet


def test_fresh_controlnet_leaves_the_base_output_bitwise_unchanged():
  unet, cn, up, cp = tiny_controlnet()
  x = jax.random.normal(jax.random.key(0), (3, *X_SHAPE))
  img = jax.random.uniform(jax.random.key(1), (3, *IMAGE_SHAPE))
  t, y = jnp.array([0, 40, 999]), jnp.array([2, 0, 3])

  @jax.jit
  def outputs(cp, scale):
    down, mid = cn.apply({"params": cp}, x, t, y, img, conditioning_scale=scale)
    controlled = unet.apply(
      {"params": up}, x, t, y, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    return unet.apply({"params": up}, x, t, y), controlled, (down, mid)

  base, out, (down, mid) = outputs(cp, jnp.ones(3))
  assert all(not np.any(np.asarray(r)) for r in (*down, mid))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
  # The encoder copy is the base's, and the new parts are where diffusers puts them.
  for name in ("conv_in", "time_embedding", "class_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
    jax.tree.map(np.testing.assert_array_equal, cp[name], up[name])
  extra = sorted(set(cp) - set(up))
  assert extra == [
    "controlnet_cond_embedding",
    *[f"controlnet_down_blocks_{j}" for j in range(4)],
    "controlnet_mid_block",
  ]
  # Trained (non-zero) zero convolutions move the output; scale 0 switches control off exactly.
  cp2 = jax.tree.map(lambda a: a + 0.05, cp)
  _, moved, _ = outputs(cp2, jnp.ones(3))
  assert float(jnp.max(jnp.abs(moved - base))) > 1e-3
  _, off, _ = outputs(cp2, jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(base[0]))
  np.testing.assert_array_equal(np.asarray(off[1]), np.asarray(moved[1]))


def test_errors():
  unet, cn, up, cp = tiny_controlnet()
  x, t, y = jnp.zeros((2, *X_SHAPE)), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)
  img = jnp.zeros((2, *IMAGE_SHAPE))
  with pytest.raises(
    ValueError, match=r"controlnet_cond must have shape \[B, H\*2, W\*2, conditioning_channels\]"
  ):
    cn.apply({"params": cp}, x, t, y, img[:, :4, :4])
  with pytest.raises(ValueError, match=r"= \(2, 8, 8, 2\) for x of shape \(2, 4, 4, 1\), got \(2, 8, 8, 1\)"):
    cn.apply({"params": cp}, x, t, y, img[..., :1])
  with pytest.raises(ValueError, match="controlnet_cond must be floating point"):
    cn.apply({"params": cp}, x, t, y, img.astype(jnp.int32))
  with pytest.raises(ValueError, match="label must have shape"):
    cn.apply({"params": cp}, x, t, y[:1], img)
  with pytest.raises(ValueError, match="mid_block_additional_residual has shape"):  # raised while tracing
    jax.eval_shape(
      lambda: unet.apply({"params": up}, x, t, y, mid_block_additional_residual=jnp.zeros((2, 4, 4, 8)))
    )
  with pytest.raises(ValueError, match="guidance_embedding"):
    UNetControlNet.from_unet(UNet(guidance_embedding=True))
