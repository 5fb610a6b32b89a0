"""AutoencoderKL: shapes, the Gaussian posterior, diffusers parity and the state-dict converter.

The parity tests build a small random diffusers ``AutoencoderKL`` with torch on CPU and are skipped
when torch/diffusers are not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import count_params
from diffjax.models.autoencoder import AutoencoderKL, DiagonalGaussian, make_codec
from diffjax.models.autoencoder_names import (
  autoencoder_kwargs_from_diffusers_config,
  autoencoder_params_to_diffusers,
  diffusers_to_autoencoder_params,
  flax_path_to_diffusers_key,
)

KWARGS = {
  "in_channels": 3,
  "out_channels": 3,
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
  "latent_channels": 4,
  "norm_num_groups": 8,
}


def _tree_shapes(module, size=16, channels=3):
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, channels)))["params"]


def _random_params(shapes, seed=0):
  """Random parameters without compiling ``init`` (XLA:CPU compiles threefry-heavy inits slowly)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), jnp.float32), shapes)


def test_shapes_and_downsampling_factor():
  vae = AutoencoderKL(**{**KWARGS, "block_out_channels": (8, 16, 16)}, mid_block_add_attention=False)
  params = _tree_shapes(vae)
  post = jax.eval_shape(
    lambda p, x: vae.apply({"params": p}, x, method=vae.encode), params, jnp.zeros((2, 32, 24, 3))
  )
  assert post.mean.shape == post.logvar.shape == (2, 8, 6, 4)
  assert vae.downsample_factor == 4
  out = jax.eval_shape(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), params, post.mean)
  assert out.shape == (2, 32, 24, 3)
  assert "attentions_0" not in params["encoder"]["mid_block"]


def test_wrong_input_shape_is_a_clear_error():
  vae = AutoencoderKL(**{**KWARGS, "block_out_channels": (8, 16)})
  params = _tree_shapes(vae, size=8)
  with pytest.raises(ValueError, match=r"expected images \[B, H, W, 3\]"):
    jax.eval_shape(lambda p: vae.apply({"params": p}, jnp.zeros((1, 8, 8, 1)), method=vae.encode), params)
  with pytest.raises(ValueError, match="must divide"):
    _tree_shapes(AutoencoderKL(**{**KWARGS, "norm_num_groups": 5}), size=8)


def test_kl_closed_form_matches_monte_carlo():
  rng = np.random.default_rng(0)
  mean = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)
  logvar = jnp.asarray(rng.normal(size=(2, 2, 2, 3)) * 0.5, jnp.float32)
  post = DiagonalGaussian(mean=mean, logvar=logvar)
  z = mean + post.std * rng.normal(size=(20000, 2, 2, 2, 3)).astype(np.float32)  # [S, B, h, w, c]
  log_q = -jax.vmap(post.nll)(z)
  log_p = -0.5 * jnp.sum(jnp.log(2 * jnp.pi) + z**2, axis=(2, 3, 4))
  mc = jnp.mean(log_q - log_p, axis=0)
  np.testing.assert_allclose(mc, post.kl(), rtol=0.03)


def test_posterior_clips_logvar_and_mode_is_mean():
  moments = jnp.concatenate([jnp.ones((1, 2, 2, 2)), jnp.full((1, 2, 2, 2), 50.0)], axis=-1)
  post = DiagonalGaussian.from_moments(moments)
  assert float(post.logvar.max()) == 20.0
  np.testing.assert_array_equal(post.mode(), jnp.ones((1, 2, 2, 2)))


def test_codec_scaling_round_trip():
  vae = AutoencoderKL(**{**KWARGS, "block_out_channels": (8, 16)})
  params = _random_params(_tree_shapes(vae, size=8))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
  enc1, dec1 = make_codec(vae)
  enc2, dec2 = make_codec(vae, scaling_factor=0.5, shift_factor=0.1)

  @jax.jit
  def run(params, x, key):
    z1, z2 = enc1(params, x), enc2(params, x)
    return z1, z2, dec1(params, z1), dec2(params, z2), enc1(params, x, key)

  z1, z2, y1, y2, zs = run(params, x, jax.random.key(2))
  np.testing.assert_allclose(z2, (z1 - 0.1) * 0.5, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-5)
  assert zs.shape == (2, 4, 4, 4) and not np.allclose(zs, z1)


def test_flax_path_to_diffusers_key():
  assert (
    flax_path_to_diffusers_key(("encoder", "mid_block", "attentions_0", "to_out_0", "kernel"))
    == "encoder.mid_block.attentions.0.to_out.0.weight"
  )
  assert flax_path_to_diffusers_key(("post_quant_conv", "bias")) == "post_quant_conv.bias"
  assert flax_path_to_diffusers_key(("decoder", "conv_norm_out", "scale")) == "decoder.conv_norm_out.weight"


def test_kwargs_from_diffusers_config():
  cfg = {
    "block_out_channels": [128, 256],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 2,
    "scaling_factor": 0.18215,
  }
  kw = autoencoder_kwargs_from_diffusers_config(cfg)
  assert kw["block_out_channels"] == (128, 256) and kw["layers_per_block"] == 2
  with pytest.raises(ValueError, match="down_block_types"):
    autoencoder_kwargs_from_diffusers_config({**cfg, "down_block_types": ["DownBlock2D"] * 2})


@pytest.fixture(scope="module")
def torch_vae():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16,
    **KWARGS,
  ).eval()
  # GroupNorm scales/biases start at 1/0: perturb everything so mis-assigned tensors cannot hide.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return torch, model, state


@pytest.fixture(scope="module")
def flax_vae():
  kw = autoencoder_kwargs_from_diffusers_config(
    {**KWARGS, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
  )
  vae = AutoencoderKL(**kw)
  return vae, _tree_shapes(vae)


def test_param_count_matches_diffusers(torch_vae, flax_vae):
  _, model, _ = torch_vae
  assert count_params(flax_vae[1]) == sum(p.numel() for p in model.parameters())


def test_encode_decode_parity(torch_vae, flax_vae):
  torch, model, state = torch_vae
  vae, shapes = flax_vae
  params = diffusers_to_autoencoder_params(state, template=shapes)
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    ref_dec = model.decode(dist.mean).sample.numpy()
  post = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
  np.testing.assert_allclose(post.mean, ref_mean.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(post.logvar, ref_logvar.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(
    params, jnp.asarray(ref_mean.transpose(0, 2, 3, 1))
  )
  np.testing.assert_allclose(dec, ref_dec.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_export_import_round_trip_is_exact(torch_vae, flax_vae):
  _, _, state = torch_vae
  _, shapes = flax_vae
  params = diffusers_to_autoencoder_params(state, template=shapes)
  exported = autoencoder_params_to_diffusers(params)
  assert set(exported) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  again = diffusers_to_autoencoder_params(exported, template=shapes)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_legacy_attention_names_import(torch_vae, flax_vae):
  _, _, state = torch_vae
  _, shapes = flax_vae
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for k, v in state.items():
    for new, old in legacy.items():
      k = k.replace(f".{new}.", f".{old}.")
    renamed[k] = v[..., None, None] if (".query." in k and v.ndim == 2) else v  # one as a 1x1 conv
  assert any(".proj_attn." in k for k in renamed)
  a = diffusers_to_autoencoder_params(renamed, template=shapes)
  b = diffusers_to_autoencoder_params(state, template=shapes)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_converter_names_missing_and_misshaped(torch_vae, flax_vae):
  _, _, state = torch_vae
  _, shapes = flax_vae
  broken = dict(state)
  del broken["decoder.conv_out.bias"]
  broken["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  broken["encoder.extra.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError) as err:
    diffusers_to_autoencoder_params(broken, template=shapes)
  msg = str(err.value)
  assert "missing diffusers key 'decoder.conv_out.bias'" in msg
  assert "shape mismatch for diffusers key 'encoder.conv_in.weight': got (32, 3, 5, 5)" in msg
  assert "(32, 3, 3, 3)" in msg
  assert "unexpected diffusers key 'encoder.extra.weight'" in msg
  assert "missing diffusers key 'encoder.conv_in.weight'" not in msg
