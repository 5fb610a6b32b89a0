"""FastComposer's math: fusion at the subject words, the localization loss, delayed conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffjax.personalization.fastcomposer import (
  balanced_l1,
  delay_switch_timestep,
  delayed_context,
  fuse_subjects,
  localization_loss,
  resize_masks,
)
from diffjax.samplers.timesteps import make_timesteps


def test_fuse_subjects_rewrites_only_given_subject_words():
  ctx = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  subjects = jnp.full((2, 2, 4), 100.0)
  positions = jnp.array([[1, 3], [4, 2]])
  valid = jnp.array([[1.0, 1.0], [0.0, 1.0]])
  out = fuse_subjects(
    lambda t, s: t + s[..., :3], context=ctx, subjects=subjects, positions=positions, valid=valid
  )
  expected = np.array(ctx)
  expected[0, 1] += 100
  expected[0, 3] += 100
  expected[1, 2] += 100  # example 1's first subject (word 4) is not given: its word keeps the text
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match="valid must be"):
    fuse_subjects(lambda t, s: t, context=ctx, subjects=subjects, positions=positions, valid=valid[:, :1])


def _authors_loss(scores, segmaps, token_idx, token_idx_mask):
  """A transcription in torch of get_object_localization_loss_for_one_layer with BalancedL1Loss
  (mit-han-lab/fastcomposer, fastcomposer/model.py), for maps already at the masks' resolution."""
  bxh, n_lat, _ = scores.shape
  b, n_obj = segmaps.shape[:2]
  heads = bxh // b
  seg = segmaps.reshape(b, n_obj, -1)
  scores = scores.view(b, heads, n_lat, -1)
  prob = torch.gather(scores, 3, token_idx.view(b, 1, 1, n_obj).expand(b, heads, n_lat, n_obj))
  seg = seg.permute(0, 2, 1).unsqueeze(1).expand(b, heads, n_lat, n_obj)
  bg = 1 - seg
  loss = (prob * bg).sum(2) / (bg.sum(2) + 1e-5) - (prob * seg).sum(2) / (seg.sum(2) + 1e-5)
  loss = loss * token_idx_mask.view(b, 1, n_obj)
  cnt = token_idx_mask.sum(1).view(b, 1) + 1e-5
  return (loss.sum(2) / cnt).mean()


def test_localization_loss_matches_the_authors_implementation():
  rng = np.random.default_rng(0)
  b, heads, h, w, s = 3, 2, 4, 8, 7
  logits = rng.normal(size=(b, heads, h, w, s))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  masks = (rng.random((b, 2, h, w)) < 0.3).astype(np.float32)
  positions = np.array([[1, 4], [2, 6], [3, 5]])
  valid = np.array([[1, 1], [1, 0], [0, 0]], np.float32)
  ours = localization_loss({"l": jnp.asarray(probs)}, masks=masks, positions=positions, valid=valid)
  ref = _authors_loss(
    torch.tensor(probs.reshape(b * heads, h * w, s)),
    torch.tensor(masks),
    torch.tensor(positions),
    torch.tensor(valid),
  )
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5, atol=1e-7)
  # Two layers at different resolutions average their losses; full-resolution masks are area-averaged.
  coarse = probs.reshape(b, heads, h // 2, 2, w // 2, 2, s).mean(axis=(3, 5))
  both = localization_loss(
    {"a": jnp.asarray(probs), "b": jnp.asarray(coarse)}, masks=masks, positions=positions, valid=valid
  )
  only_b = localization_loss(
    {"a": jnp.asarray(probs), "b": jnp.asarray(coarse)},
    masks=masks,
    positions=positions,
    valid=valid,
    layers=lambda name: name == "b",
  )
  np.testing.assert_allclose(float(both), (float(ours) + float(only_b)) / 2, rtol=1e-6)


def test_balanced_l1_is_low_when_attention_sits_in_the_mask():
  mask = np.zeros((1, 1, 16), np.float32)
  mask[..., :4] = 1
  inside = np.zeros((1, 1, 16, 1), np.float32)
  inside[:, :, :4] = 0.25
  outside = np.zeros((1, 1, 16, 1), np.float32)
  outside[:, :, 4:] = 1 / 12
  assert float(balanced_l1(inside, mask)[0, 0, 0]) == pytest.approx(-0.25, abs=1e-5)
  assert float(balanced_l1(outside, mask)[0, 0, 0]) == pytest.approx(1 / 12, abs=1e-5)


def test_resize_masks_averages_areas():
  m = np.zeros((1, 1, 4, 8), np.float32)
  m[0, 0, :2, :2] = 1
  out = resize_masks(jnp.asarray(m), (2, 4))
  np.testing.assert_array_equal(out[0, 0], [[1, 0, 0, 0], [0, 0, 0, 0]])
  assert resize_masks(jnp.asarray(m), (3, 5)).shape == (1, 1, 3, 5)


@pytest.mark.parametrize("delay, steps, early", [(0.2, 50, 10), (0.0, 50, 0), (1.0, 25, 25), (0.5, 10, 5)])
def test_delay_covers_the_first_fraction_of_uniform_steps(delay, steps, early):
  ts = np.asarray(make_timesteps(num_timesteps=1000, num_steps=steps, spacing="uniform"))[:steps]
  switch = delay_switch_timestep(delay, 1000)
  text, subject = jnp.zeros((steps, 1, 1)), jnp.ones((steps, 1, 1))
  ctx = np.asarray(delayed_context(text, subject, jnp.asarray(ts), switch))[:, 0, 0]
  assert int(np.sum(ctx == 0)) == early
  assert np.all(ctx[ts >= np.sort(ts)[::-1][early - 1]] == 0) if early else np.all(ctx == 1)
  traced = jax.jit(lambda d: delayed_context(text, subject, jnp.asarray(ts), delay_switch_timestep(d, 1000)))
  np.testing.assert_array_equal(traced(delay)[:, 0, 0], ctx)
