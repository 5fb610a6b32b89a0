"""DreamBooth's prior-preservation loss and fine-tuning step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.models.unet_condition import UNetCondition
from diffjax.personalization.dreambooth import make_dreambooth_train_step, prior_preservation_loss
from diffjax.schedules import make_schedule
from diffjax.training.state import create_train_state


def test_prior_preservation_loss_is_the_two_means():
  per = jnp.array([1.0, 3.0, 10.0, 20.0, 30.0])
  is_prior = jnp.array([0, 0, 1, 1, 1])
  loss, inst, prior = prior_preservation_loss(per, is_prior=is_prior, prior_weight=0.5)
  assert (float(inst), float(prior), float(loss)) == pytest.approx((2.0, 20.0, 12.0))
  loss, inst, prior = prior_preservation_loss(per[:2], is_prior=is_prior[:2], prior_weight=1.0)
  assert (float(loss), float(prior)) == pytest.approx((2.0, 0.0))


def test_step_ignores_class_rows_without_a_prior():
  unet = UNetCondition(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8,),
    cross_attention_levels=(True,),
    num_attention_heads=2,
    norm_num_groups=4,
  )
  b, length, d = 4, 5, 6
  x = jax.random.normal(jax.random.key(0), (b, 4, 8, 1))
  ctx = jax.random.normal(jax.random.key(1), (b, length, d))
  mask = jnp.ones((b, length), jnp.int32)
  params = unet.init(jax.random.key(2), x, jnp.zeros((b,)), ctx, mask)["params"]
  tx = optax.sgd(0.1)
  schedule = make_schedule("linear", num_timesteps=100)
  null = (jnp.zeros((1, length, d)), jnp.ones((1, length), jnp.int32))
  batch = {"x0": x, "tokens": ctx, "mask": mask, "prior": jnp.array([0, 0, 1, 1])}
  other = {**batch, "x0": batch["x0"].at[2:].set(5.0)}  # different class rows
  key = jax.random.key(3)

  # Without a prior, class rows carry no gradient: other class images give the same update.
  step = jax.jit(
    make_dreambooth_train_step(unet=unet, schedule=schedule, tx=tx, null_cond=null, prior_weight=0.0)
  )
  state = create_train_state(params=params, tx=tx)
  s0, m0 = step(state, batch, key)
  s1, m1 = step(state, other, key)
  jax.tree.map(np.testing.assert_array_equal, s0.params, s1.params)
  assert int(s0.step) == 1 and float(m0["loss"]) == pytest.approx(float(m0["instance_loss"]))
  assert float(m1["prior_loss"]) != float(m0["prior_loss"])  # measured, though not weighted
  jax.tree.map(np.testing.assert_array_equal, s0.params, s0.ema_params)  # ema_decay 0: EMA = parameters
  assert any(jax.tree.leaves(jax.tree.map(lambda a, c: bool(np.any(a != c)), s0.params, params)))
  with pytest.raises(ValueError, match="prior_weight must be >= 0"):
    make_dreambooth_train_step(unet=unet, schedule=schedule, tx=tx, null_cond=null, prior_weight=-1.0)
