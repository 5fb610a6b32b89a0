"""FastComposer's subject encoder and fusion MLP: shapes, and the fuser against the authors' module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffjax.models.subject_encoder import SubjectEncoder, SubjectFuser


def test_encoder_embeds_each_reference():
  enc = SubjectEncoder(features=(8, 16), embed_dim=12, norm_num_groups=4)
  refs = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  params = enc.init(jax.random.key(1), refs)["params"]
  out = enc.apply({"params": params}, refs)
  assert out.shape == (3, 12) and out.dtype == jnp.float32
  np.testing.assert_allclose(enc.apply({"params": params}, refs[1:2])[0], out[1], atol=1e-5)
  with pytest.raises(ValueError, match="divisible by 4"):
    enc.apply({"params": params}, refs[:, :27, :27])


class _MLP(torch.nn.Module):
  def __init__(self, in_dim, out_dim, hidden_dim, use_residual):
    super().__init__()
    self.layernorm = torch.nn.LayerNorm(in_dim)
    self.fc1 = torch.nn.Linear(in_dim, hidden_dim)
    self.fc2 = torch.nn.Linear(hidden_dim, out_dim)
    self.use_residual = use_residual

  def forward(self, x):
    h = self.fc2(torch.nn.functional.gelu(self.fc1(self.layernorm(x))))
    return x + h if self.use_residual else h


class _PostfuseModule(torch.nn.Module):
  """FastComposerPostfuseModule.fuse_fn of mit-han-lab/fastcomposer (fastcomposer/model.py), transcribed."""

  def __init__(self, dim):
    super().__init__()
    self.mlp1 = _MLP(2 * dim, dim, dim, use_residual=False)
    self.mlp2 = _MLP(dim, dim, dim, use_residual=True)
    self.layer_norm = torch.nn.LayerNorm(dim)

  def forward(self, text, obj):
    h = self.mlp1(torch.cat([text, obj], dim=-1)) + text
    return self.layer_norm(self.mlp2(h))


def _dense(layer):
  return {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}


def _norm(layer):
  return {"scale": layer.weight.detach().numpy(), "bias": layer.bias.detach().numpy()}


def test_fuser_matches_the_authors_postfuse_module():
  torch.manual_seed(0)
  dim = 16  # the authors fuse embeddings of the text width (CLIP projects images to it): E = D here
  ref = _PostfuseModule(dim)
  for p in ref.parameters():  # non-trivial LayerNorm affine parameters too
    torch.nn.init.normal_(p, std=0.3)
  params = {
    "mlp1": {
      "layernorm": _norm(ref.mlp1.layernorm),
      "fc1": _dense(ref.mlp1.fc1),
      "fc2": _dense(ref.mlp1.fc2),
    },
    "mlp2": {
      "layernorm": _norm(ref.mlp2.layernorm),
      "fc1": _dense(ref.mlp2.fc1),
      "fc2": _dense(ref.mlp2.fc2),
    },
    "layer_norm": _norm(ref.layer_norm),
  }
  text, obj = np.random.default_rng(0).normal(size=(2, 5, 3, dim)).astype(np.float32)
  fuser = SubjectFuser()
  shapes = jax.tree.map(np.shape, fuser.init(jax.random.key(0), text, obj)["params"])
  assert jax.tree.map(np.shape, params) == shapes
  out = fuser.apply({"params": params}, text, obj)
  np.testing.assert_allclose(out, ref(torch.tensor(text), torch.tensor(obj)).detach().numpy(), atol=2e-5)
  with pytest.raises(ValueError, match="leading dims"):
    fuser.apply({"params": params}, text, obj[:, :2])
