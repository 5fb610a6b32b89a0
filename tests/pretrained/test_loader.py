"""Loading a diffusers pipeline directory: component parity with diffusers, and one clear error per bad file.

Uses the session's tiny random-init Stable-Diffusion pipeline (tests/pretrained/conftest.py).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffjax.models import count_params
from diffjax.pretrained.files import read_safetensors, weights_files
from diffjax.pretrained.loader import load_pipeline, load_unet, load_vae
from diffjax.pretrained.pipeline import make_unet_fn


def _nchw(x):
  return np.transpose(x, (0, 3, 1, 2))


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def test_components_and_settings(tiny_sd, tiny_loaded):
  pipe = tiny_sd.pipe
  sd, _ = tiny_loaded
  for ours, ref in ((sd.unet, pipe.unet), (sd.vae, pipe.vae), (sd.text_encoder, pipe.text_encoder)):
    assert count_params(ours.params) == sum(p.numel() for p in ref.parameters())
  assert sd.default_size == (16, 16) and sd.vae_scale_factor == 2
  assert sd.scaling_factor == pipe.vae.config.scaling_factor
  assert sd.scheduler.spacing == "leading" and sd.scheduler.steps_offset == 1 and sd.scheduler.clip_x0 is None
  assert sd.scheduler.final_alpha_bar == float(pipe.scheduler.final_alpha_cumprod)
  ids, _ = sd.tokenizer.encode(["a red fox, in the snow!", ""])
  ref = pipe.tokenizer(["a red fox, in the snow!", ""], padding="max_length", max_length=16, truncation=True)
  np.testing.assert_array_equal(ids, ref["input_ids"])


def test_unet_parity(tiny_sd, tiny_loaded):
  torch = pytest.importorskip("torch")
  pipe = tiny_sd.pipe
  sd, params = tiny_loaded
  rng = np.random.default_rng(1)
  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 16, 32)).astype(np.float32)
  t = np.array([1, 801])
  with torch.no_grad():
    ref = _nhwc(
      pipe.unet(
        torch.from_numpy(_nchw(z)), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)
      ).sample
    )
  out = make_unet_fn(sd)(params, z, t, ctx)  # eager: one call costs less than compiling it
  err = float(np.abs(np.asarray(out) - ref).max())
  print(f"UNet2DConditionModel max abs error {err:.1e} (output scale {np.abs(ref).max():.1f})")
  assert err < 1e-4


def test_vae_encode_decode_parity(tiny_sd, tiny_loaded):
  torch = pytest.importorskip("torch")
  pipe = tiny_sd.pipe
  sd, params = tiny_loaded
  vae = sd.vae.module
  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = pipe.vae.encode(torch.from_numpy(_nchw(x))).latent_dist
    dec = _nhwc(pipe.vae.decode(dist.mean).sample)

  def run(p, x):  # eager: one call costs less than compiling it
    post = vae.apply({"params": p}, x, method=vae.encode)
    return post.mean, post.logvar, vae.apply({"params": p}, post.mean, method=vae.decode)

  mean, logvar, out = run(params["vae"], x)
  errs = {
    "mean": np.abs(np.asarray(mean) - _nhwc(dist.mean)).max(),
    "logvar": np.abs(np.asarray(logvar) - _nhwc(dist.logvar)).max(),
    "decode": np.abs(np.asarray(out) - dec).max(),
  }
  print({k: f"{v:.1e}" for k, v in errs.items()})
  assert max(errs.values()) < 1e-4, errs


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_clear_errors(tiny_sd, tmp_path):
  path = tiny_sd.path
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_pipeline(tmp_path / "nowhere")
  # A missing weights file, then pickle-only weights.
  unet = _copy(f"{path}/unet", tmp_path / "unet")
  weights = unet / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(weights))
  weights.unlink()
  with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
    load_unet(unet)
  (unet / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match="only PyTorch pickle weights.*never unpickles"):
    load_unet(unet)
  (unet / "diffusion_pytorch_model.bin").unlink()
  # A mis-shaped tensor is named, with both shapes; a missing one too.
  bad = dict(tensors, **{"conv_in.weight": np.zeros((32, 4, 1, 1), np.float32)})
  del bad["conv_out.bias"]
  save_file(bad, str(weights))
  with pytest.raises(ValueError) as err:
    load_unet(unet)
  assert "shape mismatch for parameter 'conv_in.weight'" in str(err.value)
  assert "(32, 4, 1, 1), the model expects (32, 4, 3, 3)" in str(err.value)
  assert "missing tensor 'conv_out.bias'" in str(err.value)
  # An unsupported config value is named.
  save_file(tensors, str(weights))
  config = json.loads((unet / "config.json").read_text())
  (unet / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
  with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
    load_unet(unet)
  (unet / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_unet(unet)


def test_pipeline_level_errors(tiny_sd, tmp_path):
  path = _copy(tiny_sd.path, tmp_path / "pipe")
  index = json.loads((path / "model_index.json").read_text())
  (path / "model_index.json").write_text(
    json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
  )
  with pytest.raises(ValueError, match="component 'text_encoder_2'"):
    load_pipeline(path)
  (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
  with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
    load_pipeline(path)
  (path / "model_index.json").write_text(json.dumps(index))
  sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
  (path / "scheduler" / "scheduler_config.json").write_text(
    json.dumps({**sched, "timestep_spacing": "karras"})
  )
  with pytest.raises(ValueError, match="timestep_spacing='karras'"):
    load_pipeline(path)


def test_bfloat16_and_shards(tiny_sd, tmp_path):
  torch = pytest.importorskip("torch")
  st = pytest.importorskip("safetensors.torch")
  src = tiny_sd.path + "/vae"
  tensors = load_file(f"{src}/diffusion_pytorch_model.safetensors")
  names = sorted(tensors)
  half = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
  vae = _copy(src, tmp_path / "vae")
  (vae / "diffusion_pytorch_model.safetensors").unlink()
  shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
  for fname, keys in shards.items():
    st.save_file({k: half[k] for k in keys}, str(vae / f"diffusion_pytorch_model.bf16-{fname}"))
  weight_map = {k: f"diffusion_pytorch_model.bf16-{f}" for f, keys in shards.items() for k in keys}
  (vae / "diffusion_pytorch_model.bf16.safetensors.index.json").write_text(
    json.dumps({"weight_map": weight_map})
  )
  files = weights_files(vae, stem="diffusion_pytorch_model", variant="bf16")
  read = read_safetensors(files)
  for k in names:
    np.testing.assert_array_equal(read[k], half[k].float().numpy())
  loaded = load_vae(vae, variant="bf16", dtype=jnp.bfloat16)
  assert loaded.module.dtype == jnp.bfloat16
  assert jax.tree.leaves(loaded.params)[0].dtype == np.float32


def test_loads_with_torch_unimportable(tiny_sd):
  """The whole directory loads in a process where torch, transformers and diffusers cannot be imported."""
  code = (
    "import sys\n"
    "for m in ('torch', 'transformers', 'diffusers'): sys.modules[m] = None\n"
    "from diffjax.pretrained import load_pipeline\n"
    f"sd = load_pipeline({tiny_sd.path!r}, controlnet={tiny_sd.controlnet_path!r})\n"
    "print(type(sd.unet.module).__name__, sd.tokenizer.encode(['a fox'])[0][0, :3].tolist())\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("UNetCondition")
