"""KL autoencoder on MNIST: 28x28 digits padded to 32x32 -> 8x8x4 latents (f = 4).

Run:   python -m diffjax.training.autoencoder_main --config configs/mnist_autoencoder.py \
           --workdir runs/mnist_autoencoder [--config.training.num_steps=...]
       python experiments/autoencoder.py --config configs/mnist_autoencoder.py --name autoencoder_mnist
The digits are padded with background to 32x32 so that the 8x8 latent can be halved twice more by a
latent-diffusion U-Net (8 -> 4 -> 2); held-out PSNR is measured on the central 28x28 (the original
pixels), with 500 images of MNIST's test split held out (the only split offline). L1 + 1e-6 KL.
Smoke: ``configs/mnist_autoencoder.py:smoke``.
Expect (800 steps, ~21 min on 2 CPU cores shared with other jobs): held-out PSNR 26.0 dB, scaling
factor ~0.53; experiments/results/autoencoder_mnist.md.
"""

from autoencoder_defaults import base_config, smoke


def get_config(arg: str | None = None):
  c = base_config()
  c.data.update(source="mnist_idx", path="../shared/data/mnist", split="test", holdout=500, pad_to=32)
  c.model.update(
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
  )
  c.training.update(batch_size=32, num_steps=800, learning_rate=1e-3, warmup_steps=50)
  c.eval.update(every=200, num_examples=500, crop=28)
  if arg == "smoke":
    c = smoke(c)
    c.data.holdout = 16
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mnist_autoencoder (expected 'smoke' or nothing)")
  return c
