"""UNetCondition: shapes, masking, errors, and parity with diffusers' UNet2DConditionModel.

The parity tests are skipped when torch/diffusers are not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import count_params
from diffjax.models.transformer import masked_attention, sincos_position_embedding_2d
from diffjax.models.unet_condition import UNetCondition
from diffjax.models.unet_condition_names import unet_condition_kwargs, unet_condition_params

DIFFUSERS_CONFIG = {
  "sample_size": 8,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
  "cross_attention_dim": 24,
  "attention_head_dim": 4,  # diffusers uses it as the number of heads
  "norm_num_groups": 8,
}


def _tiny(**overrides):
  kw = {"block_out_channels": (16, 32), "num_attention_heads": 2, "norm_num_groups": 4}
  return UNetCondition(**{**kw, **overrides})


def test_shapes_and_padding_is_ignored():
  unet = _tiny()
  x = jax.random.normal(jax.random.key(0), (2, 8, 16, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
  params = unet.init(jax.random.key(2), x, jnp.zeros(2), ctx, mask)["params"]
  out = unet.apply({"params": params}, x, jnp.array([10, 500]), ctx, mask)
  assert out.shape == (2, 8, 16, 4)
  # Changing padded context tokens does not change the output.
  ctx2 = ctx.at[:, 3:].set(100.0)
  out2 = unet.apply({"params": params}, x, jnp.array([10, 500]), ctx2, mask)
  np.testing.assert_allclose(out, out2, atol=1e-5)
  # ... but changing a real token does.
  out3 = unet.apply({"params": params}, x, jnp.array([10, 500]), ctx.at[:, 0].add(1.0), mask)
  assert float(jnp.max(jnp.abs(out3 - out))) > 1e-4


def test_masked_attention_matches_truncated_keys():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 3, 2, 4)) for i in range(3))
  out = masked_attention(q, k, v, jnp.array([[1, 1, 0]]))
  ref = masked_attention(q, k[:, :2], v[:, :2])
  np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, x_shape, ctx_shape, match",
  [
    ({"cross_attention_levels": (True,)}, (1, 8, 8, 4), (1, 3, 8), "cross_attention_levels"),
    ({"num_attention_heads": (2, 2, 2)}, (1, 8, 8, 4), (1, 3, 8), "num_attention_heads"),
    ({"num_attention_heads": 3}, (1, 8, 8, 4), (1, 3, 8), "not divisible by num_attention_heads"),
    ({}, (1, 7, 8, 4), (1, 3, 8), "divisible"),
    ({}, (1, 8, 8, 3), (1, 3, 8), "x must be"),
    ({}, (1, 8, 8, 4), (2, 3, 8), "context must be"),
  ],
)
def test_errors(kwargs, x_shape, ctx_shape, match):
  unet = _tiny(**kwargs)
  with pytest.raises(ValueError, match=match):
    unet.init(jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(1), jnp.zeros(ctx_shape))


def test_bad_mask_shape():
  unet = _tiny()
  with pytest.raises(ValueError, match="context_mask"):
    unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), 0, jnp.zeros((1, 3, 8)), jnp.ones((1, 4)))


def test_kwargs_refuse_unsupported_options():
  with pytest.raises(ValueError, match="addition_embed_type"):
    unet_condition_kwargs({**DIFFUSERS_CONFIG, "addition_embed_type": "text_time"})
  with pytest.raises(ValueError, match="mirror"):
    unet_condition_kwargs({**DIFFUSERS_CONFIG, "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")})


@pytest.fixture(scope="module", params=[False, True], ids=["conv_proj", "linear_proj"])
def torch_pair(request):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  tmodel = diffusers.UNet2DConditionModel(
    **DIFFUSERS_CONFIG, use_linear_projection=request.param, transformer_layers_per_block=(1, 2)
  ).eval()
  with torch.no_grad():  # perturb every tensor so that a mis-assigned one cannot cancel out
    for p in tmodel.parameters():
      p.add_(0.05 * torch.randn_like(p))
  module = UNetCondition(**unet_condition_kwargs(tmodel.config))
  params = unet_condition_params(tmodel.state_dict(), module=module)
  return torch, tmodel, module, params


def test_diffusers_parity(torch_pair):
  torch, tmodel, module, params = torch_pair
  assert count_params(params) == sum(p.numel() for p in tmodel.parameters())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 6, 24)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32)
  t = np.array([3, 781])
  with torch.no_grad():
    ref = (
      tmodel(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(t),
        encoder_hidden_states=torch.from_numpy(ctx),
        encoder_attention_mask=torch.from_numpy(mask),
      )
      .sample.permute(0, 2, 3, 1)
      .numpy()
    )
  out = np.asarray(module.apply({"params": params}, x, t, ctx, mask))
  err = float(np.max(np.abs(out - ref)))
  print(f"max abs error vs diffusers: {err:.2e}")
  assert err < 1e-4, err


def test_position_embedding_keeps_the_parameter_tree():
  x, ctx = jnp.zeros((1, 8, 16, 4)), jnp.zeros((1, 3, 8))

  def shapes(unet):
    tree = jax.eval_shape(unet.init, jax.random.key(0), x, jnp.zeros(1), ctx)["params"]
    return jax.tree.map(lambda a: a.shape, tree)

  assert shapes(_tiny(position_embedding=True)) == shapes(_tiny())
  emb = sincos_position_embedding_2d(2, 3, 8)
  assert emb.shape == (6, 8)
  np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # row 0, column 0
  np.testing.assert_allclose(emb[4, 4:], emb[1, 4:])  # same column, different row
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_position_embedding_2d(2, 2, 6)
