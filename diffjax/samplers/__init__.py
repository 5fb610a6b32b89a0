"""Scan/fori-loop based samplers that take any ``model_fn(params, x_t, t, cond)``."""

from diffjax.samplers.ddim import ddim_sample, ddim_sigma, ddim_step, ddim_update
from diffjax.samplers.ddpm import ddpm_sample, ddpm_step
from diffjax.samplers.dpm_solver import dpm_solver_sample, dpm_solver_update
from diffjax.samplers.loop import reverse_loop
from diffjax.samplers.timesteps import SPACINGS, make_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm_solver++")

__all__ = [
  "SAMPLERS",
  "SPACINGS",
  "ddim_sample",
  "ddim_sigma",
  "ddim_step",
  "ddim_update",
  "ddpm_sample",
  "ddpm_step",
  "dpm_solver_sample",
  "dpm_solver_update",
  "make_timesteps",
  "reverse_loop",
]
