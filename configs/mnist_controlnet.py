"""ControlNet (Zhang et al. 2023) on a trained MNIST DDPM, conditioned on edge maps of the digit.

Run:   python -m diffjax train-controlnet --config configs/mnist_controlnet.py --workdir runs/mnist_controlnet \
           --config.base.workdir=runs/mnist [--config.base.data_path=/abs/path/to/mnist]
       python experiments/controlnet.py --workdir runs/mnist_controlnet --judge runs/judges/mnist.safetensors
The base (``configs/mnist_ddpm.py``) stays frozen: only the ControlNet's parameters are trained, on the
base's own training split, with the conditioning image computed from each batch
(``control.kind``: "edges" = thinned Sobel edges, "low_res" = 4x average-pooled digit, "masked" = the
top half and its mask); labels are replaced by the null class half of the time (the paper's 50% prompt
dropout). Variants: ``:low_res``, ``:masked``, ``:smoke`` (a few steps on a digits smoke base, for tests).
Expect: the held-out eps-MSE of the controlled model falls clearly below the base's within the first
few hundred steps; see experiments/results/controlnet.md for the measured edge agreement.
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.base = ml_collections.ConfigDict(dict(workdir="runs/mnist", data_path=None))
  c.control = ml_collections.ConfigDict(
    dict(kind="edges", threshold=0.3, thin=True, factor=4, embedding_channels=(16,))
  )
  c.training = ml_collections.ConfigDict(
    dict(
      batch_size=32,
      num_steps=1500,
      learning_rate=5e-4,
      warmup_steps=100,
      lr_decay="constant",
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.995,
      cond_drop_prob=0.5,
      log_every=25,
      checkpoint_every=100,
      keep_checkpoints=2,
    )
  )
  c.eval = ml_collections.ConfigDict(dict(every=250, num_examples=128))
  if arg in ("low_res", "masked"):
    c.control.kind = arg
  elif arg == "smoke":
    c.training.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.eval.update(every=2, num_examples=8)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mnist_controlnet (expected low_res, masked or smoke)")
  return c
