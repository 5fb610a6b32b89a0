"""CLIPTextModel: parity with transformers' CLIPTextModel (random-init, tiny), config mapping and errors.

The parity tests build the reference with torch on CPU and are skipped without torch/transformers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffjax.models import count_params
from diffjax.models.clip_text import CLIP_ACTIVATIONS, CLIPTextModel, clip_text_config, clip_text_kwargs
from diffjax.pretrained.loader import load_text_encoder

VOCAB, EOS = 50, 49


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """A perturbed random transformers CLIPTextModel, saved, and its import by diffjax."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=12,
    hidden_act="quick_gelu",
    bos_token_id=EOS - 1,
    eos_token_id=EOS,
    pad_token_id=EOS,
  )
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # LayerNorms start at 1/0: perturb every tensor
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("clip") / "text_encoder"
  model.save_pretrained(path)
  return torch, model, path, load_text_encoder(path)


def _ids():
  ids = np.array([[EOS - 1, 5, 9, 17, EOS, EOS, EOS, EOS], [EOS - 1, 3, EOS, 7, 7, EOS, 2, 2]], np.int64)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int64)
  return ids, mask


def test_parity_with_transformers(pair):
  torch, model, _, loaded = pair
  module, params = loaded.module, loaded.params
  assert count_params(params) == sum(p.numel() for p in model.parameters())
  ids, mask = _ids()
  apply = module.apply  # eager: a few calls cost less than compiling them
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), output_hidden_states=True)
    ref_masked = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    model.eos_token_id = 2  # legacy configs pool at the largest id
    ref_legacy = model(torch.from_numpy(ids))
    model.eos_token_id = EOS
    # diffusers' clip_skip: hidden_states[-(clip_skip + 1)] through the final LayerNorm
    ref_skip = model.final_layer_norm(ref.hidden_states[-2]).numpy()
  hidden, pooled = apply({"params": params}, jnp.asarray(ids))  # Stable Diffusion's call: no mask
  errs = {
    "hidden": np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy()).max(),
    "pooled": np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max(),
  }
  hidden_m, pooled_m = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  errs["masked"] = np.abs(np.asarray(hidden_m) - ref_masked.last_hidden_state.numpy())[mask == 1].max()
  errs["masked_pooled"] = np.abs(np.asarray(pooled_m) - ref_masked.pooler_output.numpy()).max()
  legacy = module.clone(eos_token_id=2)
  errs["legacy_pooled"] = np.abs(
    np.asarray(legacy.apply({"params": params}, ids)[1]) - ref_legacy.pooler_output.numpy()
  ).max()
  skip, _ = apply({"params": params}, jnp.asarray(ids), clip_skip=1)
  errs["clip_skip"] = np.abs(np.asarray(skip) - ref_skip).max()
  print({k: f"{v:.1e}" for k, v in errs.items()})
  assert max(errs.values()) < 1e-4, errs


def test_legacy_prefix_and_position_ids_buffer(pair, tmp_path):
  _, _, path, loaded = pair
  tensors = load_file(str(path / "model.safetensors"))
  tensors = {f"text_model.{k}": v for k, v in tensors.items()}
  tensors["text_model.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
  out = tmp_path / "old"
  out.mkdir()
  save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text((path / "config.json").read_text())
  again = load_text_encoder(out)
  jax.tree.map(np.testing.assert_array_equal, again.params, loaded.params)


def test_activations_match_transformers():
  torch = pytest.importorskip("torch")
  act2fn = pytest.importorskip("transformers.activations").ACT2FN
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  for name, fn in CLIP_ACTIVATIONS.items():
    np.testing.assert_allclose(
      fn(jnp.asarray(x)), act2fn[name](torch.from_numpy(x)).numpy(), atol=2e-6, err_msg=name
    )


def test_config_round_trip_and_errors():
  module = CLIPTextModel(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=12,
    eos_token_id=EOS,
  )
  config = json.loads(json.dumps(clip_text_config(module)))
  assert CLIPTextModel(**clip_text_kwargs(config)) == module
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    clip_text_kwargs({**config, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="hidden_size is missing"):
    clip_text_kwargs({k: v for k, v in config.items() if k != "hidden_size"})
  too_long = jnp.zeros((1, 13), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jax.eval_shape(module.init, jax.random.key(0), too_long)
  with pytest.raises(ValueError, match="clip_skip"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), clip_skip=2))
