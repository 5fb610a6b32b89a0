"""The text-to-image train step: a finite update, and a skipped non-finite one.

A tiny stand-in denoiser with the U-Net's call signature keeps the compile short; the cross-attention
U-Net itself is tested in tests/models and trained end to end in test_text_loop.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.schedules import make_schedule
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.text_step import make_text_train_step


class TinyDenoiser(nn.Module):
  """``(x [B, H, W, C], t [B], context [B, S, D], mask [B, S]) -> [B, H, W, C]``: a conv plus the masked
  mean of the context."""

  @nn.compact
  def __call__(self, x, t, context, context_mask, *, train=False):
    m = context_mask[..., None].astype(x.dtype)
    pooled = jnp.sum(context * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    shift = nn.Dense(x.shape[-1])(pooled)[:, None, None, :]
    return nn.Conv(x.shape[-1], (3, 3))(x) * (1.0 + 1e-3 * t[:, None, None, None]) + shift


def test_update_and_non_finite_skip():
  unet = TinyDenoiser()
  key = jax.random.key(0)
  x0 = jax.random.normal(key, (4, 8, 16, 1))
  ctx = jax.random.normal(jax.random.fold_in(key, 1), (4, 5, 6))
  mask = jnp.array([[1, 1, 1, 0, 0]] * 4, jnp.int32)
  params = jax.jit(unet.init)(key, x0[:1], jnp.zeros(1), ctx[:1], mask[:1])["params"]
  tx = make_optimizer(learning_rate=1e-3, warmup_steps=1)
  null = (jnp.zeros((1, 5, 6)), jnp.array([[1, 1, 0, 0, 0]], jnp.int32))
  step = jax.jit(
    make_text_train_step(
      unet=unet, schedule=make_schedule("linear", num_timesteps=50), tx=tx, null_cond=null, prediction="v",
      weighting="min_snr", cond_drop_prob=0.5,
    )
  )
  state0 = create_train_state(params=params, tx=tx)
  batch = {"x0": x0, "tokens": ctx, "mask": mask}
  state, _ = step(state0, batch, key)  # learning rate 0 at step 0 (warm-up)
  state, metrics = step(state, batch, key)
  assert int(state.step) == 2 and int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))]
  assert max(moved) > 0
  bad = dict(batch, x0=x0.at[0, 0, 0, 0].set(jnp.nan))
  skipped, _ = step(state, bad, key)
  assert int(skipped.step) == 3 and int(skipped.skipped) == 1
  for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(skipped.opt_state), jax.tree.leaves(state.opt_state), strict=True):
    np.testing.assert_array_equal(a, b)
