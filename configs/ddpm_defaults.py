"""Defaults shared by the pixel-space DDPM configs; each config overrides what differs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(source="digits", path=None, split="train", data_dir=None, holdout=180, image_shape=(8, 8, 1))
  )
  c.model = ml_collections.ConfigDict(
    dict(
      in_channels=1,
      out_channels=1,
      block_out_channels=(32, 64),
      layers_per_block=1,
      attention_levels=(False, True),
      attention_head_dim=16,
      norm_num_groups=8,
      dropout=0.1,
      num_classes=10,
      # Compute dtype ("bfloat16" on accelerators; parameters stay float32), rematerialised blocks
      # (less activation memory), attention core ("auto": blocked kernel on CPU, einsum elsewhere).
      dtype="float32",
      remat=False,
      attention_impl="auto",
    )
  )
  c.diffusion = ml_collections.ConfigDict(
    dict(schedule="linear", num_timesteps=1000, prediction="eps", weighting="none", min_snr_gamma=5.0)
  )
  c.training = ml_collections.ConfigDict(
    dict(
      batch_size=128,
      num_steps=1500,
      learning_rate=2e-3,
      warmup_steps=200,
      lr_decay="cosine",
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.999,
      cond_drop_prob=0.1,
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=2,
    )
  )
  c.sample = ml_collections.ConfigDict(
    dict(sampler="ddim", num_steps=50, guidance=2.0, eta=0.0, spacing="uniform", num=100, every=1500)
  )
  c.eval = ml_collections.ConfigDict(dict(every=500, num_examples=128, num_t_samples=100))
  c.mesh = ml_collections.ConfigDict(dict(num_devices=None))
  c.distributed = ml_collections.ConfigDict(
    dict(initialize=False, coordinator_address=None, num_processes=None, process_id=None)
  )
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A seconds-long variant for tests and CI: tiny model, a few steps, few-sample evaluation."""
  c.model.block_out_channels = (16, 32)
  c.model.norm_num_groups = 4
  c.model.attention_head_dim = 8
  c.diffusion.num_timesteps = 100
  c.training.update(batch_size=16, num_steps=6, warmup_steps=2, log_every=2, checkpoint_every=3)
  c.sample.update(num_steps=5, num=20, every=0)
  c.eval.update(every=3, num_examples=16, num_t_samples=4)
  return c
