"""Export to the diffusers / transformers format: diffusers opens it, and export then import is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import UNet
from diffjax.models.autoencoder import AutoencoderKL
from diffjax.models.clip_text import CLIPTextModel
from diffjax.models.controlnet import ControlNet
from diffjax.models.unet_condition import UNetCondition
from diffjax.pretrained.configs import unet2d_config, unet2d_kwargs, unet_condition_config
from diffjax.pretrained.controlnet import load_controlnet, save_controlnet
from diffjax.pretrained.export import (
  save_pipeline,
  save_text_encoder,
  save_unet,
  save_unet2d,
  save_vae,
  scheduler_config,
)
from diffjax.pretrained.loader import load_pipeline, load_text_encoder, load_unet, load_unet2d, load_vae
from diffjax.pretrained.scheduler import scheduler_from_config
from diffjax.pretrained.state_dicts import to_state_dict
from diffjax.samplers.timesteps import make_timesteps
from diffjax.schedules import make_schedule


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_torch_equal(model, tensors):
  state = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
  assert sorted(state) == sorted(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_pipeline_round_trip(tiny_sd, tiny_controlled, tmp_path):
  diffusers = pytest.importorskip("diffusers")
  sd, _ = tiny_controlled
  out = save_pipeline(sd, tmp_path / "export")
  # diffusers opens it, with the original tensors bit for bit.
  pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(out, safety_checker=None)
  ref = tiny_sd.controlnet_pipe
  for name in ("unet", "vae", "text_encoder", "controlnet"):
    got = {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
    _assert_torch_equal(getattr(ref, name), got)
  ids = ["a red fox", "it's the moon!"]
  assert (
    pipe.tokenizer(ids, padding="max_length", max_length=16)["input_ids"]
    == ref.tokenizer(ids, padding="max_length", max_length=16)["input_ids"]
  )
  # ... and diffjax reads back the same parameters, tokenizer and scheduler.
  again = load_pipeline(out)
  for name in ("unet", "vae", "text_encoder", "controlnet"):
    _assert_trees_equal(getattr(again, name).params, getattr(sd, name).params)
    assert getattr(again, name).module == getattr(sd, name).module
  np.testing.assert_array_equal(again.tokenizer.encode(ids)[0], sd.tokenizer.encode(ids)[0])
  assert again.scheduler.config == sd.scheduler.config


def _random(module, *args, seed=0):
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(scale=0.1, size=s.shape).astype(np.float32), shapes)


def test_diffjax_models_open_in_diffusers(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  z, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 24))
  unet = UNetCondition(
    block_out_channels=(16, 32),
    num_attention_heads=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    norm_num_groups=4,
    cross_attention_levels=(True, False),
    dropout=0.1,
  )
  # diffusers' ControlNetModel has no dropout option
  cn = ControlNet.from_unet(unet.clone(dropout=0.0), conditioning_embedding_out_channels=(8, 16))
  cases = [
    ("unet", unet, _random(unet, z, t, ctx), save_unet, load_unet, diffusers.UNet2DConditionModel),
    (
      "controlnet",
      cn,
      _random(cn, z, t, ctx, jnp.zeros((1, 16, 16, 3))),
      save_controlnet,
      load_controlnet,
      diffusers.ControlNetModel,
    ),
    (
      "unet2d",
      UNet(
        in_channels=3,
        out_channels=3,
        num_classes=10,
        norm_num_groups=4,
        block_out_channels=(16, 32),
        dropout=0.1,  # training-only, but part of the module: the round trip keeps it
      ),
      None,
      save_unet2d,
      load_unet2d,
      diffusers.UNet2DModel,
    ),
    (
      "vae",
      AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4),
      None,
      save_vae,
      load_vae,
      diffusers.AutoencoderKL,
    ),
    (
      "text_encoder",
      CLIPTextModel(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=29,
      ),
      None,
      save_text_encoder,
      load_text_encoder,
      transformers.CLIPTextModel,
    ),
  ]
  inputs = {
    "unet2d": (jnp.zeros((1, 8, 8, 3)), t),
    "vae": (jnp.zeros((1, 8, 8, 3)),),
    "text_encoder": (jnp.zeros((1, 4), jnp.int32),),
  }
  for name, module, params, save, load, torch_cls in cases:
    params = params if params is not None else _random(module, *inputs[name])
    path = tmp_path / name
    save(path, module=module, params=params)
    model, info = torch_cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
    _assert_torch_equal(model, to_state_dict(params))
    back = load(path)
    assert back.module == module, name
    _assert_trees_equal(back.params, jax.tree.map(np.asarray, params))


def test_unet2d_config_mapping_matches_the_parity_tested_one():
  diffusers = pytest.importorskip("diffusers")
  # tests/models/test_unet_diffusers_parity.py checks this pair numerically.
  ref = diffusers.UNet2DModel(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=11,
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    attention_head_dim=8,
  )
  ours = UNet(
    in_channels=1,
    out_channels=1,
    attention_levels=(False, True),
    num_classes=10,
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    attention_head_dim=8,
  )
  assert UNet(**unet2d_kwargs(ref.config)) == ours
  assert UNet(**unet2d_kwargs(unet2d_config(ours))) == ours


def test_unet2d_import_matches_diffusers(tmp_path):
  """A saved random-init UNet2DModel (class-conditional) imported by load_unet2d gives diffusers' output."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from tests.pretrained.tiny_sd import perturb

  torch.manual_seed(0)
  ref = diffusers.UNet2DModel(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=11,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
  )
  perturb(torch, ref, seed=9).save_pretrained(tmp_path / "unet")
  loaded = load_unet2d(tmp_path / "unet")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  t, label = np.array([10, 731]), np.array([3, 10])  # a real class and the null class
  with torch.no_grad():
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    out = ref(nchw, torch.from_numpy(t), class_labels=torch.from_numpy(label))
  ours = loaded.module.apply({"params": loaded.params}, x, t, label)  # eager: cheaper than compiling once
  err = float(np.abs(np.asarray(ours) - out.sample.permute(0, 2, 3, 1).numpy()).max())
  print(f"UNet2DModel max abs error {err:.1e}")
  assert err < 1e-4


def test_unrepresentable_options_are_refused():
  with pytest.raises(ValueError, match="position_embedding"):
    unet_condition_config(UNetCondition(position_embedding=True), cross_attention_dim=8)
  with pytest.raises(ValueError, match="guidance_embedding"):
    unet2d_config(UNet(guidance_embedding=True))
  with pytest.raises(ValueError, match="attention_head_dim"):
    unet2d_kwargs(
      {
        "block_out_channels": (8,),
        "down_block_types": ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"],
        "attention_head_dim": None,
      }
    )


@pytest.mark.parametrize(
  "kind, T", [("linear", 1000), ("linear", 200), ("cosine", 1000), ("scaled_linear", 500)]
)
def test_scheduler_config_reproduces_diffjax_schedules(kind, T):
  ours = make_schedule(kind, num_timesteps=T)
  exported = scheduler_from_config(scheduler_config(kind, num_timesteps=T, prediction="v"))
  np.testing.assert_allclose(exported.schedule.alphas_cumprod, ours.alphas_cumprod, rtol=2e-6, atol=1e-9)
  assert exported.prediction == "v" and exported.final_alpha_bar == 1.0 and exported.clip_x0 == 1.0
  # diffjax's uniform DDIM timesteps when the step count divides T
  np.testing.assert_array_equal(
    exported.table(20).timesteps[:20], make_timesteps(num_timesteps=T, num_steps=20, spacing="uniform")[:20]
  )
