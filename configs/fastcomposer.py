"""FastComposer (Xiao et al. 2023) on a two-digit-scenes text-to-image model: subjects from reference digits.

Run:   python -m diffjax.training.personalize_main --config configs/fastcomposer.py \
           --workdir runs/fastcomposer/loc --config.base_workdir=runs/text/scenes
       python experiments/personalization.py          # DreamBooth and FastComposer, measured
Starts from the base run's U-Net (fine-tuned) and trains a CNN subject encoder (28x28 digit -> 256-d)
and FastComposer's fusion MLP from scratch; MiniLM stays frozen. The training data are the base run's own
scenes (the first 8,000 of its 20,000, about 1.6 epochs at these settings) with each digit's own image,
randomly rotated (+-10 deg), scaled (0.9-1.1) and shifted (+-2 px), as its reference, its pixels as its
mask and its digit word in the caption as its token. Per step, the caption is dropped with probability
0.1 (classifier-free guidance) and the subjects alone with probability 0.1 (text-only context, which
delayed conditioning samples from first). Localization loss: the balanced L1 of each subject token's
cross-attention outside minus inside its mask, over the coarse (4x8) cross-attention layers, weight 0.05; the
diffusion loss is v-prediction MSE on standardised latents (about 0.05 after base training), so 0.05
gives the two terms comparable gradients early in training (FastComposer used 0.001 with SD's eps loss).
Sampling: text-only context for the first 0.2 of the DDIM steps (delayed subject conditioning).
Sized for about ten minutes on 2 shared CPU cores (2,000 steps of batch 16).
Variants: ``:no_loc`` (localization weight 0: the loss is only logged), ``:smoke`` (tiny; needs a
base_workdir).
Expect (experiments/results/personalization.md, on the 4,750-step scenes base): subject fidelity 0.63 on
unseen digits without fine-tuning (DreamBooth 0.68-0.77, base 0.32); two-subject prompts right 0.84 with the
localization loss vs 0.44 without (merged 0.13 vs 0.38).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "fastcomposer"
  c.seed = 0
  c.base_workdir = "runs/text/scenes"  # a trained text-to-image run (diffjax.training.text_main)
  c.data_path = None  # the digits' directory when the base config's (relative) path does not resolve here
  c.data = ml_collections.ConfigDict({"max_scenes": 8000})  # first scenes of the base run's training set
  c.references = ml_collections.ConfigDict(
    {"max_rotation": 10.0, "scale_range": (0.9, 1.1), "max_shift": 2.0, "object_appear_prob": 1.0}
  )
  # Keyword arguments of diffjax.models.subject_encoder.SubjectEncoder.
  c.encoder = ml_collections.ConfigDict({"features": (32, 64), "embed_dim": 256, "norm_num_groups": 8})
  c.fastcomposer = ml_collections.ConfigDict(
    {
      "localization_weight": 0.05,
      # Path prefixes of the layers of the loss (empty: every cross-attention layer). FastComposer's code
      # leaves out Stable Diffusion's highest-resolution layers; here that leaves the 4x8 level (the level
      # whose maps make prompt-to-prompt's local blend work, experiments/results/p2p.md).
      "localization_layers": ("down_blocks_1", "mid_block", "up_blocks_0"),
      "uncondition_prob": 0.1,
      "text_only_prob": 0.1,
      "delay": 0.2,  # fraction of sampling steps with the text-only context
    }
  )
  c.training = ml_collections.ConfigDict(
    {
      "batch_size": 16,
      "num_steps": 2000,
      "learning_rate": 1e-4,  # the U-Net (fine-tuned)
      "new_learning_rate": 1e-3,  # the encoder and fuser (from scratch)
      "warmup_steps": 50,
      "lr_decay": "constant",
      "weight_decay": 0.0,
      "grad_clip": 1.0,
      "ema_decay": 0.995,
      "log_every": 25,
      "checkpoint_every": 100,
      "keep_checkpoints": 2,
    }
  )
  c.sample = ml_collections.ConfigDict({"num_steps": 50, "guidance": 4.0})
  c.mesh = ml_collections.ConfigDict({"num_devices": None})
  if arg == "no_loc":
    c.fastcomposer.localization_weight = 0.0
  elif arg == "smoke":
    c.data.max_scenes = 32
    c.encoder.update(features=(8, 8), embed_dim=16, norm_num_groups=4)
    c.fastcomposer.localization_layers = ()  # the smoke base has one level
    c.training.update(batch_size=4, num_steps=3, warmup_steps=1, log_every=1, checkpoint_every=2)
    c.sample.num_steps = 3
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of fastcomposer (expected no_loc, smoke or nothing)")
  return c
