"""ControlNet on an imported pipeline: residuals and a whole 5-step DDIM run equal to diffusers'.

The reference is ``StableDiffusionControlNetPipeline`` over the session's tiny random-init components.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from diffjax.pretrained.controlnet import load_controlnet
from diffjax.pretrained.pipeline import encode_prompts, make_text_to_image

PROMPTS = ["a red fox in the snow", "an oil painting of the city at night"]


def _control_image():
  return np.random.default_rng(5).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)


def test_residuals_match_diffusers(tiny_sd, tiny_controlled):
  torch = pytest.importorskip("torch")
  sd, params = tiny_controlled
  cn = tiny_sd.controlnet_pipe.controlnet
  rng = np.random.default_rng(4)
  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 16, 32)).astype(np.float32)
  t, image = np.array([21, 901]), _control_image()
  with torch.no_grad():
    down, mid = cn(
      torch.from_numpy(z).permute(0, 3, 1, 2),
      torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(ctx),
      controlnet_cond=torch.from_numpy(image).permute(0, 3, 1, 2),
      conditioning_scale=0.7,
      return_dict=False,
    )
  module = sd.controlnet.module
  # eager: one call costs less than compiling it
  ours_down, ours_mid = module.apply(
    {"params": params["controlnet"]}, z, t, ctx, image, conditioning_scale=0.7
  )
  assert len(ours_down) == len(down)
  errs = [
    np.abs(np.asarray(o) - r.permute(0, 2, 3, 1).numpy()).max() for o, r in zip(ours_down, down, strict=True)
  ]
  errs.append(np.abs(np.asarray(ours_mid) - mid.permute(0, 2, 3, 1).numpy()).max())
  print(f"ControlNet residuals: max abs error {max(errs):.1e}")
  assert max(errs) < 1e-4


def test_controlnet_pipeline_matches_diffusers(tiny_sd, tiny_controlled):
  torch = pytest.importorskip("torch")
  sd, params = tiny_controlled
  latents = np.random.default_rng(6).standard_normal((2, 8, 8, 4)).astype(np.float32)
  image = _control_image()
  with torch.no_grad():
    ref = (
      tiny_sd.controlnet_pipe(
        prompt=PROMPTS,
        image=torch.from_numpy(image).permute(0, 3, 1, 2),
        num_inference_steps=5,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.8,
        latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
        output_type="latent",
      )
      .images.permute(0, 2, 3, 1)
      .numpy()
    )
  ctx, null = encode_prompts(sd, params, PROMPTS), encode_prompts(sd, params, ["", ""])
  generate = make_text_to_image(sd)
  _, z = generate(
    params, jax.random.key(0), ctx, null, num_steps=5, guidance=7.5, latents=latents, control=(image, 0.8)
  )
  err = float(np.abs(np.asarray(z) - ref).max() / max(1.0, np.abs(ref).max()))
  print(
    f"ControlNet pipeline, 5 DDIM steps: max error {err:.1e} relative to the latent scale {np.abs(ref).max():.1f}"
  )
  assert err < 1e-4
  # Scale 0 switches the ControlNet off: the plain pipeline's latents.
  _, z0 = generate(
    params, jax.random.key(0), ctx, null, num_steps=5, guidance=7.5, latents=latents, control=(image, 0.0)
  )
  with torch.no_grad():
    plain = (
      tiny_sd.pipe(
        prompt=PROMPTS,
        num_inference_steps=5,
        guidance_scale=7.5,
        latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
        output_type="latent",
      )
      .images.permute(0, 2, 3, 1)
      .numpy()
    )
  assert np.abs(np.asarray(z0) - plain).max() / max(1.0, np.abs(plain).max()) < 1e-4
  with pytest.raises(ValueError, match="control"):
    generate(params, jax.random.key(0), ctx, null, num_steps=5)
  with pytest.raises(ValueError, match="control image must be"):
    generate(params, jax.random.key(0), ctx, null, control=(image[:, :8], 1.0))


def test_load_errors(tiny_sd, tmp_path):
  path = shutil.copytree(tiny_sd.controlnet_path, tmp_path / "cn")
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
  with pytest.raises(ValueError, match="global_pool_conditions=True"):
    load_controlnet(path)
  (path / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
  with pytest.raises(ValueError, match="not a ControlNetModel"):
    load_controlnet(path)
