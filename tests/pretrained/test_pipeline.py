"""A whole 5-step DDIM text-to-image run equal to diffusers' StableDiffusionPipeline; image-to-image checks.

Both pipelines start from the same latents (diffusers' ``latents=``) on the session's tiny random-init
pipeline; diffusers runs ``DDIMScheduler.from_config`` of the directory's scheduler config.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.pretrained import pipeline as sd_pipeline
from diffjax.pretrained.pipeline import (
  encode_prompts,
  make_image_to_image,
  make_text_to_image,
  make_unet_fn,
)

PROMPTS = ["a photograph of an astronaut riding a horse on the moon", "a red fox in the snow"]
NEGATIVE = ["low quality", ""]


def test_text_to_image_matches_diffusers(tiny_sd, tiny_loaded):
  torch = pytest.importorskip("torch")
  pipe = tiny_sd.pipe
  sd, params = tiny_loaded
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = {"prompt": PROMPTS, "negative_prompt": NEGATIVE, "num_inference_steps": 5, "guidance_scale": 7.5}
  with torch.no_grad():
    ref_ctx, ref_null = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    start = torch.from_numpy(latents).permute(0, 3, 1, 2)
    ref_out = pipe(**kw, latents=start, output_type="latent").images
    # what output_type="np" does after the loop (one pipeline run instead of two)
    decoded = pipe.vae.decode(ref_out / pipe.vae.config.scaling_factor).sample
    ref_img = pipe.image_processor.postprocess(decoded, output_type="np")
    ref_z = ref_out.permute(0, 2, 3, 1).numpy()
  ctx, null = encode_prompts(sd, params, PROMPTS), encode_prompts(sd, params, NEGATIVE)
  generate = make_text_to_image(sd)
  img, z = generate(params, jax.random.key(0), ctx, null, num_steps=5, guidance=7.5, latents=latents)
  errs = {
    "context": np.abs(np.asarray(ctx) - ref_ctx.numpy()).max(),
    "negative_context": np.abs(np.asarray(null) - ref_null.numpy()).max(),
    "latents": np.abs(np.asarray(z) - ref_z).max() / max(1.0, np.abs(ref_z).max()),
    "images": np.abs(np.asarray(img) - ref_img).max(),
  }
  print({k: f"{v:.1e}" for k, v in errs.items()}, f"latent scale {np.abs(ref_z).max():.1f}")
  assert max(errs.values()) < 1e-4, errs
  # Steps and guidance are traced: other values reuse the compiled loop.
  compiled = sd_pipeline._text_to_image._cache_size()
  img3, _ = generate(params, jax.random.key(0), ctx, null, num_steps=3, guidance=1.0, latents=latents)
  assert sd_pipeline._text_to_image._cache_size() == compiled
  assert np.abs(np.asarray(img3) - np.asarray(img)).max() > 1e-3
  with pytest.raises(ValueError, match="num_steps"):
    generate(params, jax.random.key(0), ctx, null, num_steps=0)
  with pytest.raises(ValueError, match="latents must be"):
    generate(params, jax.random.key(0), ctx, null, latents=latents[:, :4])
  with pytest.raises(ValueError, match="multiples of 4"):
    generate(params, jax.random.key(0), ctx, null, height=18)


def test_image_to_image(tiny_loaded):
  sd, params = tiny_loaded
  ctx, null = encode_prompts(sd, params, PROMPTS), encode_prompts(sd, params, ["", ""])
  images = np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  edit = make_image_to_image(sd)
  a, za = edit(params, jax.random.key(1), images, ctx, null, strength=0.6, num_steps=10)
  b, _ = edit(params, jax.random.key(1), images, ctx, null, strength=0.6, num_steps=10)
  c, _ = edit(params, jax.random.key(1), images, ctx, null, strength=0.2, num_steps=10)
  assert a.shape == images.shape and za.shape == (2, 8, 8, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(np.abs(np.asarray(a) - np.asarray(c)).max()) > 1e-3
  assert sd_pipeline._image_to_image._cache_size() == 1  # strength is traced
  with pytest.raises(ValueError, match="strength"):
    edit(params, jax.random.key(1), images, ctx, null, strength=1.5)
  with pytest.raises(ValueError, match="images must be"):
    edit(params, jax.random.key(1), images[:1], ctx, null)


def test_unet_fn_takes_attention_control(tiny_loaded, tiny_controlled):
  """The imported U-Net's model_fn hands ``attention_control`` to every U-Net attention layer (traced only)."""
  for (sd, params), cond in (
    (tiny_loaded, lambda z, ctx: ctx),
    (tiny_controlled, lambda z, ctx: (ctx, jnp.zeros((z.shape[0], 16, 16, 3)), jnp.ones((z.shape[0],)))),
  ):
    seen = []

    def control(probs, info, seen=seen):
      seen.append((info.layer, info.is_cross, probs.shape))
      return probs

    unet_fn = make_unet_fn(sd)
    z, ctx = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 16, 32))
    t = jnp.zeros((2,))
    out = jax.eval_shape(lambda p: unet_fn(p, z, t, cond(z, ctx), attention_control=control), params)
    assert out.shape == z.shape
    # the U-Net's 4 transformers (down 0, mid, two in up 1) with self- and cross-attention; the ControlNet's
    # 2 are not controlled
    assert sorted(is_cross for _, is_cross, _ in seen) == [False] * 4 + [True] * 4
    assert {shape[-1] for _, is_cross, shape in seen if is_cross} == {16}
