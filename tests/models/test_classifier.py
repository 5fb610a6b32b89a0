"""NoisyClassifier: the U-Net's encoder half (same names and shapes) with a pooled head."""

import jax
import jax.numpy as jnp
import pytest

from diffjax.models import UNet
from diffjax.models.classifier import NoisyClassifier

KW = {"block_out_channels": (16, 32), "attention_head_dim": 8, "norm_num_groups": 4, "layers_per_block": 1}


def test_encoder_half_of_the_unet():
  clf = NoisyClassifier(num_classes=7, **KW)
  x = jnp.zeros((2, 8, 8, 1))
  p = jax.eval_shape(clf.init, jax.random.key(0), x, jnp.zeros(2, jnp.int32))["params"]
  u = jax.eval_shape(UNet(**KW).init, jax.random.key(0), x, jnp.zeros(2, jnp.int32))["params"]
  assert set(p) == {
    "conv_in",
    "time_embedding",
    "down_blocks_0",
    "down_blocks_1",
    "mid_block",
    "out_norm",
    "out",
  }
  for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
    assert jax.tree.map(lambda a: a.shape, p[name]) == jax.tree.map(lambda a: a.shape, u[name])
  logits = jax.jit(clf.apply)(
    {"params": jax.jit(clf.init)(jax.random.key(0), x, 0)["params"]}, x, jnp.array([0, 9])
  )
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_errors():
  clf = NoisyClassifier(num_classes=10, **KW)
  with pytest.raises(ValueError, match="channels"):
    clf.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), 0)
  with pytest.raises(ValueError, match="divisible"):
    clf.init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)), 0)
  with pytest.raises(ValueError, match="t must be"):
    clf.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros(3))
  with pytest.raises(ValueError, match="num_classes"):
    NoisyClassifier(num_classes=1, **KW).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), 0)
