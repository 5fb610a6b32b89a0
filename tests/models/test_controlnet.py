"""ControlNet for UNetCondition: zero-init no-op, residual plumbing, errors, and parity with diffusers.

The parity tests are skipped when torch/diffusers are not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import count_params
from diffjax.models.controlnet import ControlNet, controlnet_params_from_unet, guess_mode_scales
from diffjax.models.controlnet_names import controlnet_kwargs, controlnet_params
from diffjax.models.unet_condition import UNetCondition
from diffjax.models.unet_condition_names import unet_condition_kwargs, unet_condition_params

UNET_CONFIG = {
  "sample_size": 8,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
  "cross_attention_dim": 24,
  "attention_head_dim": 4,
  "norm_num_groups": 8,
  "transformer_layers_per_block": (1, 2),
}
CONTROLNET_EXTRA = {"conditioning_channels": 3, "conditioning_embedding_out_channels": (8, 16)}


@pytest.fixture(scope="module")
def tiny():
  unet = UNetCondition(block_out_channels=(16, 32), num_attention_heads=2, norm_num_groups=4)
  cn = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  ctx = jax.random.normal(jax.random.key(1), (2, 3, 12))
  img = jax.random.uniform(jax.random.key(2), (2, 16, 16, 1))
  t = jnp.array([5, 700])
  key = jax.random.key(3, impl="unsafe_rbg")  # cheaper to compile than threefry; values are irrelevant
  up = jax.jit(unet.init)(key, x, t, ctx)["params"]
  cp = controlnet_params_from_unet(jax.jit(cn.init)(jax.random.fold_in(key, 1), x, t, ctx, img)["params"], up)

  @jax.jit
  def run(cp, scale):
    """Base output, controlled output, residuals at ``scale`` and guess-mode residuals (scale 1)."""
    down, mid = cn.apply({"params": cp}, x, t, ctx, img, conditioning_scale=scale)
    controlled = unet.apply(
      {"params": up}, x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    guess = cn.apply({"params": cp}, x, t, ctx, img, guess_mode=True)
    return unet.apply({"params": up}, x, t, ctx), controlled, (down, mid), guess

  return unet, cn, up, cp, (x, t, ctx, img), run


def test_fresh_controlnet_leaves_the_base_output_bitwise_unchanged(tiny):
  _, _, up, cp, _, run = tiny
  base, controlled, (down, mid), _ = run(cp, jnp.ones(2))
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  np.testing.assert_array_equal(np.asarray(controlled), np.asarray(base))
  for name in ("conv_in", "time_embedding", "down_blocks_0", "down_blocks_1", "mid_block"):
    jax.tree.map(np.testing.assert_array_equal, cp[name], up[name])


def test_scale_and_guess_mode_weight_the_residuals(tiny):
  _, _, _, cp, _, run = tiny
  cp2 = jax.tree.map(lambda a: a + 0.1, cp)  # a "trained" ControlNet: non-zero zero-convolutions
  base, out, (down, _), _ = run(cp2, jnp.array([1.0, 0.5]))
  _, _, (d_1, m_1), (d_g, m_g) = run(cp2, jnp.ones(2))
  assert float(jnp.max(jnp.abs(out - base))) > 1e-3
  w = np.asarray(guess_mode_scales(len(d_1)))
  np.testing.assert_allclose(w[[0, -1]], [0.1, 1.0], rtol=1e-6)
  np.testing.assert_allclose(d_g[0], 0.1 * d_1[0], rtol=1e-5)
  np.testing.assert_allclose(d_g[2], w[2] * d_1[2], rtol=1e-5)
  np.testing.assert_allclose(m_g, m_1, rtol=1e-6)
  np.testing.assert_allclose(down[1][1], 0.5 * d_1[1][1], rtol=1e-6)
  np.testing.assert_allclose(down[1][0], d_1[1][0], rtol=1e-6)


def test_errors(tiny):
  unet, cn, up, cp, (x, t, ctx, img), _ = tiny
  with pytest.raises(ValueError, match=r"controlnet_cond must have shape \[B, H\*2, W\*2"):
    cn.apply({"params": cp}, x, t, ctx, img[:, :8, :8])
  with pytest.raises(ValueError, match="controlnet_cond"):
    cn.apply({"params": cp}, x, t, ctx, jnp.concatenate([img, img], -1))
  # The remaining checks run after parts of the network: trace them (eval_shape) instead of computing.
  with pytest.raises(ValueError, match="conditioning_scale"):
    jax.eval_shape(lambda: cn.apply({"params": cp}, x, t, ctx, img, conditioning_scale=jnp.ones(3)))
  down, _ = jax.eval_shape(lambda: cn.apply({"params": cp}, x, t, ctx, img))

  def base(**residuals):
    return jax.eval_shape(lambda r: unet.apply({"params": up}, x, t, ctx, **r), residuals)

  with pytest.raises(ValueError, match="has 3 tensors but the U-Net has 4 skip"):
    base(down_block_additional_residuals=down[:-1])
  with pytest.raises(ValueError, match=r"down_block_additional_residuals\[1\] has shape"):
    base(down_block_additional_residuals=(down[0], down[2], *down[2:]))
  with pytest.raises(ValueError, match="mid_block_additional_residual has shape"):
    base(mid_block_additional_residual=down[0])
  other = UNetCondition(block_out_channels=(16, 16), num_attention_heads=2, norm_num_groups=4)
  shapes = jax.eval_shape(other.init, jax.random.key(0), x, t, ctx)["params"]
  op = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(ValueError, match="architecture differs"):
    controlnet_params_from_unet(cp, op)


def test_config_refuses_unsupported_options():
  cfg = {k: v for k, v in UNET_CONFIG.items() if k not in ("up_block_types", "out_channels", "sample_size")}
  assert controlnet_kwargs({**cfg, **CONTROLNET_EXTRA})["conditioning_embedding_out_channels"] == (8, 16)
  with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
    controlnet_kwargs({**cfg, "controlnet_conditioning_channel_order": "bgr"})
  with pytest.raises(ValueError, match="class_embed_type"):
    controlnet_kwargs({**cfg, "class_embed_type": "timestep"})


@pytest.fixture(scope="module")
def torch_models():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()
  with torch.no_grad():  # perturb every tensor so that a mis-assigned one cannot cancel out
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  cn_fresh = diffusers.ControlNetModel.from_unet(unet, **CONTROLNET_EXTRA).eval()
  cn = diffusers.ControlNetModel.from_unet(unet, **CONTROLNET_EXTRA).eval()
  with torch.no_grad():  # the zero convolutions too
    for p in cn.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return torch, unet, cn_fresh, cn


def _to_torch(torch, a):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def test_from_unet_matches_diffusers(torch_models):
  _, unet_t, cn_fresh_t, _ = torch_models
  base = UNetCondition(**unet_condition_kwargs(unet_t.config))
  bp = unet_condition_params(unet_t.state_dict(), module=base)
  module = ControlNet(**controlnet_kwargs(cn_fresh_t.config))
  assert module == ControlNet.from_unet(base, **CONTROLNET_EXTRA)
  ref = controlnet_params(cn_fresh_t.state_dict(), module=module)
  x, img = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 16, 16, 3))
  fresh = jax.jit(module.init)(
    jax.random.key(0, impl="unsafe_rbg"), x, jnp.zeros(1), jnp.zeros((1, 3, 24)), img
  )["params"]
  ours = controlnet_params_from_unet(fresh, bp)
  assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, ref)
  for name in ref:  # the encoder copy equals diffusers' from_unet copy; zero convolutions are zero in both
    if name != "controlnet_cond_embedding":  # (randomly initialised in both)
      jax.tree.map(np.testing.assert_array_equal, ours[name], ref[name])
  np.testing.assert_array_equal(ours["controlnet_cond_embedding"]["conv_out"]["kernel"], 0.0)


def test_diffusers_parity(torch_models):
  torch, unet_t, _, cn_t = torch_models
  base = UNetCondition(**unet_condition_kwargs(unet_t.config))
  bp = unet_condition_params(unet_t.state_dict(), module=base)
  module = ControlNet(**controlnet_kwargs(cn_t.config))
  cp = controlnet_params(cn_t.state_dict(), module=module)
  assert count_params(cp) == sum(p.numel() for p in cn_t.parameters())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
  img = rng.uniform(size=(2, 16, 32, 3)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
  t = np.array([3, 781])
  for guess_mode, scale in ((False, 0.7), (True, 1.0)):
    with torch.no_grad():
      down_t, mid_t = cn_t(
        _to_torch(torch, x),
        torch.from_numpy(t),
        encoder_hidden_states=torch.from_numpy(ctx),
        controlnet_cond=_to_torch(torch, img),
        conditioning_scale=scale,
        guess_mode=guess_mode,
        return_dict=False,
      )
      out_t = unet_t(
        _to_torch(torch, x),
        torch.from_numpy(t),
        encoder_hidden_states=torch.from_numpy(ctx),
        down_block_additional_residuals=down_t,
        mid_block_additional_residual=mid_t,
      ).sample
    down, mid = module.apply({"params": cp}, x, t, ctx, img, conditioning_scale=scale, guess_mode=guess_mode)
    assert len(down) == len(down_t)
    errs = [
      float(np.max(np.abs(np.asarray(d) - np.moveaxis(r.numpy(), 1, -1)))) for d, r in zip(down, down_t)
    ]
    errs.append(float(np.max(np.abs(np.asarray(mid) - np.moveaxis(mid_t.numpy(), 1, -1)))))
    out = base.apply(
      {"params": bp}, x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
    )
    out_err = float(np.max(np.abs(np.asarray(out) - np.moveaxis(out_t.numpy(), 1, -1))))
    print(f"guess_mode={guess_mode}: residual max abs error {max(errs):.2e}, controlled U-Net {out_err:.2e}")
    assert max(errs) < 1e-4 and out_err < 1e-4, (errs, out_err)
