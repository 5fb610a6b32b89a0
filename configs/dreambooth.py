"""DreamBooth (Ruiz et al. 2023) on a two-digit-scenes text-to-image model: one writer's digit as subject.

Run:   python -m diffjax.training.personalize_main --config configs/dreambooth.py \
           --workdir runs/dreambooth/four --config.base_workdir=runs/text/scenes
       python -m diffjax sample --workdir ... (the fine-tuned U-Net: see experiments/personalization.py)
       python experiments/personalization.py          # DreamBooth and FastComposer, measured
The subject is a distinctive held-out MNIST "4" (the digit at the 0.9 quantile of distance to the class's
mean image among the base run's held-out digits, which the base model never saw) in 4 shots (the digit
and 3 random small rotations/scalings/shifts), each in a two-digit scene beside a random training digit
and captioned with the rare identifier "bwv" (one WordPiece of MiniLM): "a bwv 4 to the left of a 7".
The base model only knows two-digit captions, so the subject always shares the scene with another digit.
Prior preservation: 100 class images generated once by the base model from the same captions without the
identifier ("a 4 to the left of a 7", DDIM-50, w = 4), weight 1.0. Every step fine-tunes the U-Net on 4
subject rows + 4 class rows (a global batch sharded along the ``data`` mesh axis).
Variants: ``:no_prior`` (prior weight 0, no class images: the language-drift baseline), ``:smoke``
(tiny, for tests; needs a base_workdir).
Expect (what experiments/personalization.py measures; not yet run on the MNIST base): subject fidelity of
"a bwv 4 ..." scenes above the base model's, and with prior preservation less drift of "a 4 ..." scenes
towards the subject than without.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "dreambooth"
  c.seed = 0
  c.base_workdir = "runs/text/scenes"  # a trained text-to-image run (diffjax.training.text_main)
  c.data_path = None  # the digits' directory when the base config's (relative) path does not resolve here
  c.subject = ml_collections.ConfigDict(
    {
      "label": 4,
      "index": None,  # index among the base run's held-out digits; None: the distinctive one of `label`
      "quantile": 0.9,
      "num_images": 4,
      "identifier": "bwv",
      "seed": 0,
      "max_rotation": 10.0,
      "scale_range": (0.9, 1.1),
      "max_shift": 2.0,
    }
  )
  c.prior = ml_collections.ConfigDict(
    {"weight": 1.0, "num_images": 100, "guidance": 4.0, "num_steps": 50, "batch_size": 50, "cache_dir": None}
  )
  c.training = ml_collections.ConfigDict(
    {
      "num_steps": 300,
      "instance_batch": 4,
      "class_batch": 4,
      "learning_rate": 1e-4,
      "warmup_steps": 10,
      "lr_decay": "constant",
      "weight_decay": 0.0,
      "grad_clip": 1.0,
      "cond_drop_prob": 0.0,
      "ema_decay": 0.0,
      "log_every": 25,
      "checkpoint_every": 100,
      "keep_checkpoints": 1,
    }
  )
  c.mesh = ml_collections.ConfigDict({"num_devices": None})
  if arg == "no_prior":
    c.prior.weight = 0.0
  elif arg == "smoke":
    c.subject.update(label=3, num_images=3)
    c.prior.update(num_images=4, num_steps=2, batch_size=4)
    c.training.update(
      num_steps=3, instance_batch=2, class_batch=2, warmup_steps=1, log_every=1, checkpoint_every=2
    )
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of dreambooth (expected no_prior, smoke or nothing)")
  return c
