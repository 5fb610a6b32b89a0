"""Sinusoidal timestep embedding vs. a closed-form NumPy version of diffusers' formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import TimestepEmbedding, get_timestep_embedding


def reference_embedding(t, dim, flip_sin_to_cos, shift, scale=1.0, max_period=10000.0):
  """diffusers.models.embeddings.get_timestep_embedding written out in NumPy."""
  t = np.asarray(t, dtype=np.float64)
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - shift))
  args = scale * t[:, None] * freqs[None, :]
  emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = np.pad(emb, ((0, 0), (0, 1)))
  return emb


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("dim", [32, 7])
def test_matches_closed_form(flip, shift, dim):
  t = np.array([0, 1, 17, 250, 999])
  got = get_timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  assert got.shape == (5, dim)
  assert got.dtype == jnp.float32
  # float32 sin/cos of arguments up to ~1000 rad: absolute error ~1e-4.
  np.testing.assert_allclose(np.asarray(got), reference_embedding(t, dim, flip, shift), atol=2e-4)


def test_fractional_timesteps_and_layout():
  t = np.array([0.0, 0.5, 2.25], dtype=np.float32)
  got = np.asarray(get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=0.0))
  np.testing.assert_allclose(got, reference_embedding(t, 16, True, 0.0), atol=1e-6)
  # t = 0 -> cos half ones, sin half zeros, and cos comes first when flipped.
  np.testing.assert_allclose(got[0, :8], 1.0)
  np.testing.assert_allclose(got[0, 8:], 0.0)


def test_rejects_non_1d():
  with pytest.raises(ValueError, match="timesteps"):
    get_timestep_embedding(jnp.zeros((2, 2)), 8)


def test_matches_diffusers_if_available():
  torch = pytest.importorskip("torch")
  emb_mod = pytest.importorskip("diffusers.models.embeddings")
  t = np.array([0, 3, 500, 999])
  for flip, shift in [(True, 0.0), (False, 1.0)]:
    ref = emb_mod.get_timestep_embedding(torch.tensor(t), 32, flip, shift).numpy()
    got = get_timestep_embedding(jnp.asarray(t), 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)


def test_timestep_embedding_mlp_names_and_shape():
  mod = TimestepEmbedding(128)
  variables = mod.init(jax.random.PRNGKey(0), jnp.zeros((3, 32)))
  params = variables["params"]
  assert set(params) == {"linear_1", "linear_2"}
  assert params["linear_1"]["kernel"].shape == (32, 128)
  assert params["linear_2"]["kernel"].shape == (128, 128)
  assert mod.apply(variables, jnp.ones((3, 32))).shape == (3, 128)
