"""Class-conditional v-prediction DDPM on 8x8 digits: the teacher of progressive and guided distillation.

Run:   python -m diffjax train --config configs/digits_ddpm_v.py --workdir runs/digits_v
       python -m diffjax distill --config configs/digits_distill.py --teacher runs/digits_v \
           --workdir runs/digits_distill
Smoke: --config configs/digits_ddpm_v.py:smoke (a few steps, for tests).
The same model, data and schedule as ``digits_ddpm.py`` but predicting v = alpha eps - sigma x0
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Sec. 4): an
eps-prediction model cannot be distilled down to one step, where x0 = (z - sigma eps) / alpha is
ill-posed at alpha -> 0. The labels are dropped with probability 0.1, so it is also a classifier-free
guidance teacher. Expect: 1,500 steps at batch 128 in about 5-7 minutes on a 2-core CPU; DDIM-64
samples of each requested digit (experiments/results/distillation.md).
"""

from ddpm_defaults import base_config, smoke


def get_config(arg: str | None = None):
  c = base_config()
  c.diffusion.prediction = "v"
  if arg == "smoke":
    c = smoke(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of digits_ddpm_v (expected 'smoke' or nothing)")
  return c
