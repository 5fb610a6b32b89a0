"""Noise-conditional MNIST classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

Run:   python -m diffjax train-classifier --config configs/mnist_classifier.py --workdir runs/mnist_classifier \
           --config.data.path=../shared/data/mnist
       python experiments/guidance_compare.py --workdir runs/mnist --classifier runs/mnist_classifier \
           --judge runs/judges/mnist.safetensors
The encoder half of the ``configs/mnist_ddpm.py`` U-Net (same widths, levels and attention) with a
pooled linear head, trained by cross-entropy on images noised at uniformly random t of the same linear
T = 1000 schedule, on the same 9,500 / 500 split of MNIST's test split. Smoke: ``:smoke`` (digits, a few
steps). Expect held-out accuracy near the judge's at t = 0 and falling towards chance (0.1) as t -> T;
see the ``eval_acc_t*`` rows of the work directory's metrics.jsonl.
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(
      source="mnist_idx",
      path="../shared/data/mnist",
      split="test",
      data_dir=None,
      holdout=500,
      image_shape=(28, 28, 1),
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      num_classes=10,
      in_channels=1,
      block_out_channels=(32, 64, 64),
      layers_per_block=1,
      attention_levels=(False, False, True),
      attention_head_dim=32,
      norm_num_groups=8,
      dropout=0.1,
    )
  )
  c.diffusion = ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=1000))
  c.training = ml_collections.ConfigDict(
    dict(
      batch_size=64,
      num_steps=2000,
      learning_rate=1e-3,
      warmup_steps=100,
      lr_decay="cosine",
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      log_every=50,
      checkpoint_every=250,
      keep_checkpoints=2,
    )
  )
  c.eval = ml_collections.ConfigDict(dict(every=500, num_examples=500, timesteps=(0, 250, 500, 750, 999)))
  if arg == "smoke":
    c.data.update(source="digits", path=None, split="train", holdout=32, image_shape=(8, 8, 1))
    c.model.update(
      block_out_channels=(16, 32), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4
    )
    c.diffusion.num_timesteps = 100
    c.training.update(batch_size=16, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.eval.update(every=2, num_examples=16, timesteps=(0, 50))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mnist_classifier (expected 'smoke' or nothing)")
  return c
