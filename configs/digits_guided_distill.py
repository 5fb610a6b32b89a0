"""Guided distillation of the digits CFG teacher (Meng et al. 2023): one forward pass per step for any w.

Run:   python -m diffjax train --config configs/digits_ddpm_v.py --workdir runs/digits_v
       python -m diffjax distill --config configs/digits_guided_distill.py --teacher runs/digits_v \
           --workdir runs/digits_guided_distill
Smoke: --config configs/digits_guided_distill.py:smoke (for tests; with a ``digits_ddpm_v.py:smoke`` teacher).
Stage one (``stage_guided``, 800 updates) trains a copy of the teacher with a zero-initialised Fourier
embedding of w to regress the teacher's classifier-free-guided output u + w (c - u), w ~ U[0, 4], t uniform
over all T; stage two distills that student progressively, 64 -> 32 -> 16 -> 8 steps (500 updates each),
with w drawn per example and given to teacher and student alike. Sampling at any w then costs one forward
pass per step instead of two.
Expect: about 58 min on a 2-core CPU shared with other jobs; at w = 2 the 8-step student's FD is within
3% of the 64-step CFG teacher's at 1/16 of its forward passes, accuracy equal
(experiments/results/distillation.md).
"""

from digits_distill import get_config as progressive_config


def get_config(arg: str | None = None):
  c = progressive_config("smoke" if arg == "smoke" else None)
  c.distill.guided = True
  if arg == "smoke":
    c.distill.update(start_steps=4, end_steps=2, guided_steps=4)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of digits_guided_distill (expected 'smoke' or nothing)")
  else:
    c.distill.update(start_steps=64, end_steps=8, guided_steps=800)
  return c
