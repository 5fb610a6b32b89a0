"""Class-conditional DDPM on MNIST from IDX files (28x28x1).

Run:   python -m diffjax train --config configs/mnist_ddpm.py --workdir runs/mnist \
           --config.data.path=../shared/data/mnist
       python -m diffjax sample --workdir runs/mnist --steps 50 --guidance 2 --num 100 --out runs/mnist/s.npz
The offline copy holds only MNIST's 10,000-image test split, so by default training uses it
(split "test") with 500 images held out for bits/dim; point data.path/split at the training files
where you have them. Smoke: ``configs/mnist_ddpm.py:smoke``.
Expect (2-core CPU): see the README's MNIST section for the measured time and sample grid.
"""

from ddpm_defaults import base_config, smoke


def get_config(arg: str | None = None):
  c = base_config()
  c.data.update(
    source="mnist_idx", path="../shared/data/mnist", split="test", holdout=500, image_shape=(28, 28, 1)
  )
  c.model.update(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_levels=(False, False, True),
    attention_head_dim=32,
    norm_num_groups=8,
    dropout=0.1,
  )
  c.training.update(
    batch_size=64,
    num_steps=2500,
    learning_rate=2e-3,
    warmup_steps=200,
    log_every=50,
    checkpoint_every=250,
    keep_checkpoints=2,
  )
  c.sample.update(num=100, every=2500)
  c.eval.update(every=500, num_examples=64, num_t_samples=50)
  if arg == "smoke":
    c = smoke(c)
    c.model.update(block_out_channels=(16, 32, 32), attention_levels=(False, False, True))
    c.data.holdout = 32
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mnist_ddpm (expected 'smoke' or nothing)")
  return c
