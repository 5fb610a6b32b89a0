"""Prompt-to-prompt: the per-step control, the local blend and the joint DDIM run on a tiny U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.editing.prompt_to_prompt import (
  EditSpec,
  in_first_steps,
  local_blend_mask,
  prompt_to_prompt_control,
  prompt_to_prompt_sample,
)
from diffjax.guidance import classifier_free_guidance
from diffjax.models.attention_control import AttentionInfo
from diffjax.models.unet_condition import UNetCondition
from diffjax.samplers import ddim_sample
from diffjax.schedules import make_schedule
from tests.models.random_params import random_params

P, L = 2, 5
CROSS = AttentionInfo("down_blocks_0/attentions_0/transformer_blocks_0/attn2", True, (2, 3))
SELF = AttentionInfo("down_blocks_0/attentions_0/transformer_blocks_0/attn1", False, (2, 3))


def _spec(**kw):
  perm = np.eye(L, dtype=np.float32)[[0, 2, 1, 3, 4]]  # edit token 2 takes source token 1 and back
  base = {
    "mapper": np.stack([np.eye(L, dtype=np.float32), perm]),
    "alphas": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32),
    "scales": np.array([[1, 1, 1, 1, 1], [1, 3, 1, 1, 1]], np.float32),
    "blend": np.zeros((2 * P, L), np.float32),
  }
  return EditSpec(**{k: jnp.asarray(v) for k, v in {**base, **kw}.items()})


def _probs(rows, lq, lk, seed=0):
  return jax.nn.softmax(jax.random.normal(jax.random.key(seed), (rows, 2, lq, lk)), axis=-1)


def test_in_first_steps_matches_the_authors_step_count():
  on = [bool(in_first_steps(s, 0.8, 5)) for s in range(5)]
  assert on == [True, True, True, True, False]
  assert not bool(in_first_steps(0, 0.0, 50)) and bool(in_first_steps(49, 1.0, 50))
  assert [bool(in_first_steps(s, 0.3, 10)) for s in (2, 3)] == [True, False]


def test_cross_attention_replacement_mapping_reweighting_and_gating():
  spec = _spec()
  probs = _probs(2 * 2 * P, 6, L)  # [cond: src, edit | null: src, edit] x P pairs
  ctl = prompt_to_prompt_control(spec=spec, step=0, num_steps=10, cross_replace=0.5, self_replace=0.0)
  out = ctl(probs, CROSS)
  src, own = probs[:P], probs[P : 2 * P]
  np.testing.assert_array_equal(out[:P], src)  # the source rows are never touched
  np.testing.assert_array_equal(out[2 * P :], probs[2 * P :])  # nor the unconditional half
  np.testing.assert_array_equal(out[P], src[0])  # pair 0: identity mapper, no reweighting
  # Pair 1: tokens 1 and 2 swap sources, token 1 is scaled by 3, tokens 3 and 4 keep their own.
  ref = jnp.stack([src[1, ..., 0], 3 * src[1, ..., 2], src[1, ..., 1], own[1, ..., 3], own[1, ..., 4]], -1)
  np.testing.assert_allclose(out[P + 1], ref, rtol=1e-6)
  # After the first half of the steps the edit attends with its own maps; self-attention is off.
  late = prompt_to_prompt_control(spec=spec, step=5, num_steps=10, cross_replace=0.5, self_replace=0.0)
  np.testing.assert_array_equal(late(probs, CROSS), probs)
  self_probs = _probs(2 * P, 6, 6, seed=1)  # no guidance: one copy
  np.testing.assert_array_equal(ctl(self_probs, SELF), self_probs)


def test_self_attention_injection_and_its_layer_limit():
  spec = _spec()
  probs = _probs(2 * P, 6, 6)
  ctl = prompt_to_prompt_control(spec=spec, step=3, num_steps=10, cross_replace=0.0, self_replace=0.4)
  out = ctl(probs, SELF)
  np.testing.assert_array_equal(out[P:], probs[:P])
  limited = prompt_to_prompt_control(
    spec=spec, step=3, num_steps=10, cross_replace=0.0, self_replace=0.4, self_max_tokens=4
  )
  np.testing.assert_array_equal(limited(probs, SELF), probs)
  with pytest.raises(ValueError, match="multiple of 2 x 2 pairs"):
    ctl(probs[:3], SELF)


def test_local_blend_mask_is_the_union_of_thresholded_pooled_maps():
  maps = np.zeros((2, 5, 7), np.float32)  # one pair: source row, edit row
  maps[0, 1, 1] = 1.0
  maps[1, 3, 5] = 4.0
  maps[1, 0, 6] = 1.0  # below 0.3 of the edit's peak
  mask = np.asarray(local_blend_mask(jnp.asarray(maps), threshold=0.3))[0, ..., 0]
  ref = np.zeros((5, 7), np.float32)
  ref[0:3, 0:3] = 1.0  # 3x3 max-pool around the source's peak
  ref[2:5, 4:7] = 1.0  # and around the edit's
  np.testing.assert_array_equal(mask, ref)
  assert float(local_blend_mask(jnp.zeros((2, 5, 7)), threshold=0.3).max()) == 0.0


@pytest.fixture(scope="module")
def tiny():
  """A one-level cross-attention U-Net with random weights (quick to compile), pixels 8x8x1."""
  unet = UNetCondition(
    in_channels=1, out_channels=1, block_out_channels=(8,), cross_attention_levels=(True,),
    num_attention_heads=2, norm_num_groups=4,
  )
  ctx = jax.random.normal(jax.random.key(1), (2 * P, L, 6))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
  null = (jax.random.normal(jax.random.key(2), (1, L, 6)), jnp.array([[1, 1, 0, 0, 0]], jnp.int32))
  params = random_params(unet, jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), ctx[:1], mask[:1])
  x_T = jax.random.normal(jax.random.key(3), (P, 8, 8, 1))
  return unet, params, (ctx, mask), null, x_T


SCHEDULE = make_schedule("linear", num_timesteps=100)
NO_BLEND = 1.0  # blend_start 1: the local blend never starts


@pytest.fixture(scope="module")
def p2p_run(tiny):
  unet, params, cond, null, x_T = tiny

  @jax.jit
  def run(cross, self_, threshold, start, blend_words):
    return prompt_to_prompt_sample(
      unet=unet,
      params=params,
      schedule=SCHEDULE,
      x_T=x_T,
      key=jax.random.key(4),
      cond=cond,
      null_cond=null,
      spec=_spec(blend=blend_words),
      guidance=3.0,
      num_steps=4,
      cross_replace=cross,
      self_replace=self_,
      blend=True,
      blend_threshold=threshold,
      blend_start=start,
      clip_x0=None,
    )

  return lambda cross, self_, threshold=0.3, start=NO_BLEND, words=None: np.asarray(
    run(cross, self_, threshold, start, jnp.ones((2 * P, L)) if words is None else words)
  )


def test_without_control_the_edit_is_a_plain_regeneration(tiny, p2p_run):
  unet, params, (ctx, mask), null, x_T = tiny
  out = p2p_run(0.0, 0.0)  # no replacement, no injection, no blend

  def model_fn(p, x, t, c):
    return unet.apply({"params": p}, x, t, *c)

  null_b = jax.tree.map(lambda v: jnp.broadcast_to(v, (2 * P, *v.shape[1:])), null)
  guided = classifier_free_guidance(model_fn, guidance_scale=3.0, null_cond=null_b)
  ref = jax.jit(
    lambda: ddim_sample(
      model_fn=guided, params=params, schedule=SCHEDULE, x_T=jnp.concatenate([x_T, x_T]),
      key=jax.random.key(4), cond=(ctx, mask), num_steps=4, clip_x0=None,
    )
  )()
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_control_ties_the_edit_to_the_source_and_blend_keeps_it(p2p_run):
  free = p2p_run(0.0, 0.0)
  tied = p2p_run(1.0, 1.0)
  gap = lambda x: np.abs(x[P:] - x[:P]).mean()  # noqa: E731
  assert gap(free) > 0.05
  # Injection changes the edits (how much they then look like their sources is for a trained model to
  # show: experiments/p2p.py) and never the sources.
  assert np.abs(tied[P:] - free[P:]).mean() > 1e-3 * gap(free)
  np.testing.assert_array_equal(tied[:P], free[:P])
  # No blend words (empty maps) or a threshold above 1: every step keeps the source sample exactly.
  np.testing.assert_array_equal(p2p_run(0.0, 0.0, start=0.0, words=jnp.zeros((2 * P, L)))[P:], free[:P])
  np.testing.assert_array_equal(p2p_run(0.0, 0.0, threshold=2.0, start=0.0)[P:], free[:P])
  # Threshold 0 on positive maps lets the whole edit through: a plain regeneration again.
  np.testing.assert_allclose(p2p_run(0.0, 0.0, threshold=0.0, start=0.0), free, atol=1e-5)
  # (All tokens' attention sums to 1 everywhere; one token's is uneven, though nearly flat in a random
  # U-Net, hence a threshold close to its peak.) A blend on token 1 keeps the source outside its marked
  # area: the edit lies between the source and the free edit.
  part = p2p_run(0.0, 0.0, threshold=0.99, start=0.0, words=jnp.zeros((2 * P, L)).at[:, 1].set(1.0))
  assert 0 < gap(part) < gap(free)


def test_shape_errors(tiny):
  unet, params, cond, null, x_T = tiny
  with pytest.raises(ValueError, match="x_T must be"):
    prompt_to_prompt_sample(
      unet=unet, params=params, schedule=SCHEDULE, x_T=x_T[:1], key=jax.random.key(0), cond=cond,
      null_cond=null, spec=_spec(), num_steps=2,
    )


def test_bad_blend_maps(tiny):
  unet, params, cond, null, x_T = tiny
  with pytest.raises(ValueError, match="blend_maps must be one of"):
    prompt_to_prompt_sample(
      unet=unet, params=params, schedule=SCHEDULE, x_T=x_T, key=jax.random.key(0), cond=cond,
      null_cond=null, spec=_spec(), num_steps=2, blend=True, blend_maps="coarse",
    )
