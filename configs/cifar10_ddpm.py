"""Class-conditional DDPM on CIFAR-10 through TFDS (``tfds.data_source``; no TensorFlow needed).

Run (on a machine where TFDS has prepared cifar10, e.g. after ``tfds build cifar10``):
       python -m diffjax train --config configs/cifar10_ddpm.py --workdir runs/cifar10
This is the architecture of Ho et al.'s CIFAR-10 model scaled down (channels 64/128/128/128 here vs
128/256/256/256), meant for accelerators; it does not fit a 2-core CPU's time budget.
Smoke: ``configs/cifar10_ddpm.py:smoke`` (used by tests under ``tfds.testing.mock_data``).
"""

from ddpm_defaults import base_config, smoke


def get_config(arg: str | None = None):
  c = base_config()
  c.data.update(source="tfds:cifar10", split="train", holdout=1000, image_shape=(32, 32, 3))
  c.model.update(
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 128, 128),
    layers_per_block=2,
    attention_levels=(False, True, False, False),
    attention_head_dim=64,
    norm_num_groups=32,
    dropout=0.1,
  )
  c.training.update(
    batch_size=128,
    num_steps=200_000,
    learning_rate=2e-4,
    warmup_steps=5000,
    lr_decay="constant",
    ema_decay=0.9999,
    log_every=100,
    checkpoint_every=5000,
  )
  c.sample.update(num=100, every=10_000)
  c.eval.update(every=10_000, num_examples=256, num_t_samples=100)
  if arg == "smoke":
    c = smoke(c)
    c.model.update(block_out_channels=(16, 32), attention_levels=(False, True))
    c.data.holdout = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of cifar10_ddpm (expected 'smoke' or nothing)")
  return c
