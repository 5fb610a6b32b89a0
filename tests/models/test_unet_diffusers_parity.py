"""Parity with diffusers' UNet2DModel: parameter count, names and outputs.

Skipped when torch/diffusers are not installed. The pure key-renaming rules are
tested without them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import UNet, count_params
from diffjax.models.diffusers_names import diffusers_key_to_path, diffusers_to_flax_params


@pytest.mark.parametrize(
  "key, ndim, path",
  [
    ("down_blocks.0.resnets.1.conv1.weight", 4, ("down_blocks_0", "resnets_1", "conv1", "kernel")),
    ("down_blocks.0.resnets.1.norm1.weight", 1, ("down_blocks_0", "resnets_1", "norm1", "scale")),
    ("mid_block.attentions.0.to_out.0.bias", 1, ("mid_block", "attentions_0", "to_out_0", "bias")),
    ("up_blocks.1.attentions.2.query.weight", 2, ("up_blocks_1", "attentions_2", "to_q", "kernel")),
    ("time_embedding.linear_1.weight", 2, ("time_embedding", "linear_1", "kernel")),
    ("class_embedding.weight", 2, ("class_embedding", "embedding")),
    ("up_blocks.0.upsamplers.0.conv.weight", 4, ("up_blocks_0", "upsamplers_0", "conv", "kernel")),
  ],
)
def test_key_renaming(key, ndim, path):
  assert diffusers_key_to_path(key, ndim) == path


def test_key_renaming_rejects_buffers():
  with pytest.raises(ValueError, match="weight"):
    diffusers_key_to_path("foo.running_mean", 1)


CONFIG = dict(
  block_out_channels=(32, 64),
  layers_per_block=2,
  norm_num_groups=8,
  attention_head_dim=8,
)


@pytest.fixture(scope="module")
def torch_model():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=11,
    **CONFIG,
  ).eval()
  # Perturb every tensor (GroupNorm scales/biases start at 1/0) so that a
  # wrong transpose or mis-assigned tensor cannot cancel out.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return torch, model


@pytest.fixture(scope="module")
def flax_model_and_shapes():
  model = UNet(in_channels=1, out_channels=1, attention_levels=(False, True), num_classes=10, **CONFIG)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)))
  return model, shapes["params"]


def test_param_count_matches(torch_model, flax_model_and_shapes):
  _, tmodel = torch_model
  _, shapes = flax_model_and_shapes
  assert count_params(shapes) == sum(p.numel() for p in tmodel.parameters())


def test_every_key_maps_to_a_leaf_of_equal_size(torch_model, flax_model_and_shapes):
  _, tmodel = torch_model
  _, shapes = flax_model_and_shapes
  flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  state = tmodel.state_dict()
  mapped = set()
  for key, value in state.items():
    path = diffusers_key_to_path(key, value.ndim)
    assert path in flat, f"{key} -> {'/'.join(path)} missing in diffjax params"
    assert int(np.prod(flat[path].shape)) == value.numel(), key
    mapped.add(path)
  assert mapped == set(flat), f"diffjax leaves without diffusers key: {set(flat) - mapped}"


def test_numerical_parity(torch_model, flax_model_and_shapes):
  torch, tmodel = torch_model
  model, shapes = flax_model_and_shapes
  params = diffusers_to_flax_params(tmodel.state_dict(), template=shapes)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  t = np.array([10, 731])
  label = np.array([3, 10])  # a real class and the null class
  with torch.no_grad():
    ref = tmodel(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      torch.from_numpy(t),
      class_labels=torch.from_numpy(label),
    ).sample.numpy()
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(label))
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_conversion_reports_mismatch(torch_model, flax_model_and_shapes):
  _, tmodel = torch_model
  _, shapes = flax_model_and_shapes
  state = dict(tmodel.state_dict())
  del state["conv_out.bias"]
  with pytest.raises(ValueError, match="missing: conv_out/bias"):
    diffusers_to_flax_params(state, template=shapes)


def test_numerical_parity_28x28_three_levels():
  """Unconditional 3-level model on 28 -> 14 -> 7 (the MNIST layout)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(1)
  cfg = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
  tmodel = diffusers.UNet2DModel(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    **cfg,
  ).eval()
  with torch.no_grad():
    for p in tmodel.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model = UNet(attention_levels=(False, False, True), **cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), 0)
  params = diffusers_to_flax_params(tmodel.state_dict(), template=shapes["params"])

  x = np.random.default_rng(1).normal(size=(2, 28, 28, 1)).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500).sample.numpy()
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x), 500)
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
