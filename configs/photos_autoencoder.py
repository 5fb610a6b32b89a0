"""KL autoencoder on 32x32 patches of real photographs: 32x32x3 -> 4x4x4 latents (f = 8, as SD's VAE).

Run:   python -m diffjax.training.autoencoder_main --config configs/photos_autoencoder.py \
           --workdir runs/photos_autoencoder
       python experiments/autoencoder.py --config configs/photos_autoencoder.py --name autoencoder_photos
Data: scikit-learn's two sample photographs (427x640, no download). Training patches are random crops
(with left-right flips) of the left 80% of each photograph's columns; the held-out patches tile the
right 20%, which training never sees. Trained on 32x32 patches only, the model should be applied to
32x32 tiles: in one piece a whole 416x128 strip decodes much worse (GroupNorm statistics and the global
mid-block attention differ), see the results.
L1 + 1e-6 KL (LDM's KL-f8 weight); 4 latent channels as in Stable Diffusion's VAE; no discriminator
(it trades PSNR for sharpness). Smoke: ``configs/photos_autoencoder.py:smoke``.
Expect (700 steps, ~16 min on 2 CPU cores shared with other jobs): held-out PSNR mean 28.3 dB over the
104 patches (pooled-MSE PSNR 21.8 dB: flat sky patches are easy, foliage is blurred), scaling factor
~0.23; experiments/results/autoencoder_photos.md.
"""

from autoencoder_defaults import base_config, smoke


def get_config(arg: str | None = None):
  c = base_config()
  c.data.update(source="photos", patch_size=32, num_train=20000, holdout_fraction=0.2)
  c.model.update(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
  )
  c.training.update(batch_size=16, num_steps=700, learning_rate=1e-3, warmup_steps=50)
  c.eval.update(every=200, num_examples=1000)
  if arg == "smoke":
    c = smoke(c)
    c.model.block_out_channels = (8, 16, 16, 16)
    c.data.num_train = 64
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of photos_autoencoder (expected 'smoke' or nothing)")
  return c
