"""One tiny class-conditional U-Net and its freshly initialised ControlNet, built once per test session.

Shared by the ControlNet tests (compiling a U-Net's initialiser dominates their time on a 2-core CPU):
``(unet, controlnet, unet_params, controlnet_params)`` with the encoder copy taken from the U-Net. The
ControlNet's conditioning image is 2x larger than ``x`` (two embedder steps); images are ``[B, 4, 4, 1]``.
"""

import functools

import jax
import jax.numpy as jnp

from diffjax.models import UNet
from diffjax.models.controlnet import controlnet_params_from_unet
from diffjax.models.unet_controlnet import UNetControlNet

X_SHAPE, IMAGE_SHAPE = (4, 4, 1), (8, 8, 2)


@functools.lru_cache(maxsize=1)
def tiny_controlnet():
  unet = UNet(
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=4,
    num_classes=3,
    attention_impl="xla",
  )
  cn = UNetControlNet.from_unet(unet, conditioning_channels=2, conditioning_embedding_out_channels=(8, 8))
  x, img, t = jnp.zeros((1, *X_SHAPE)), jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros((1,), jnp.int32)
  key = jax.random.key(0, impl="unsafe_rbg")  # cheaper to compile than threefry; values are irrelevant
  up = jax.jit(unet.init)(key, x, t, t)["params"]
  fresh = jax.jit(cn.init)(jax.random.fold_in(key, 1), x, t, t, img)["params"]
  return unet, cn, up, controlnet_params_from_unet(fresh, up)
