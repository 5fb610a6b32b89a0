"""Progressive distillation of the v-prediction digits teacher, 64 DDIM steps down to 1 (Salimans & Ho 2022).

Run:   python -m diffjax train --config configs/digits_ddpm_v.py --workdir runs/digits_v
       python -m diffjax distill --config configs/digits_distill.py --teacher runs/digits_v \
           --workdir runs/digits_distill
       python experiments/distillation.py --teacher runs/digits_v --progressive runs/digits_distill \
           --guided runs/digits_guided_distill --judge runs/judges/digits.safetensors
Smoke: --config configs/digits_distill.py:smoke (4 -> 1 steps, a few updates per stage; with a
``digits_ddpm_v.py:smoke`` teacher), for tests.
Six halvings, 64 -> 32 -> ... -> 1, each a stage of ``steps_per_stage`` updates in ``workdir/stage_NNN/``
(config.json, metrics.jsonl, checkpoints, samples.png); rerun the command to resume. The teacher samples
with DDIM on the 2N-step trailing grid, the student regresses the one-step x target with truncated-SNR
weighting; no EMA and no dropout in the student, and the learning rate warms up and decays (cosine) within
each stage (the paper: Adam 5e-5 over 50k steps per halving, linear decay, EMA 0).
Expect: about 73 min on a 2-core CPU shared with other jobs (500 updates per halving at batch 128); the
4-step student's FD 1.12x the teacher's at 64 DDIM steps, 5x better than DDIM or DPM-Solver++ at 4 steps
(experiments/results/distillation.md).
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.distill = ml_collections.ConfigDict(
    {
      "guided": False,  # True: stage one of guided distillation first (configs/digits_guided_distill.py)
      "start_steps": 64,  # the teacher's DDIM step count: the first student takes half
      "end_steps": 1,
      "steps_per_stage": 500,
      "weighting": "truncated_snr",  # x-space weight max(SNR, 1)
      "guided_steps": 0,  # updates of the guided stage one
      "w_min": 0.0,
      "w_max": 4.0,
    }
  )
  c.student = ml_collections.ConfigDict({"dropout": 0.0})  # overrides of the teacher's model config
  c.training = ml_collections.ConfigDict(
    {
      "batch_size": 128,
      "learning_rate": 3e-4,
      "warmup_steps": 20,
      "lr_decay": "cosine",
      "weight_decay": 0.0,
      "grad_clip": 1.0,
      "ema_decay": 0.0,
      "log_every": 50,
      "checkpoint_every": 200,
      "keep_checkpoints": 2,
    }
  )
  c.sample = ml_collections.ConfigDict({"num": 100, "guidance": 2.0})  # a grid per stage; num=0: none
  c.mesh = ml_collections.ConfigDict({"num_devices": None})
  if arg == "smoke":
    c.distill.update(start_steps=4, end_steps=1, steps_per_stage=4, guided_steps=4)
    c.training.update(batch_size=16, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.sample.num = 10
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of digits_distill (expected 'smoke' or nothing)")
  return c
