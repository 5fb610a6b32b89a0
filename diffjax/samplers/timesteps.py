"""Timestep subsets for few-step samplers, computable with a traced step count.

The subsets are returned padded to length T so that changing the number of steps does not change any
array shape and therefore does not recompile a jitted sampler. Entry ``i < num_steps`` is the i-th
smallest timestep of the subset; entries past ``num_steps`` are unused.

References:
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Sec. D.2 (uniform and quadratic).
  Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed" ("trailing").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SPACINGS = ("uniform", "quadratic", "trailing")


@struct.dataclass
class TimestepTable:
  """An explicit timestep plan for a sampler, in place of a ``spacing`` (e.g. a diffusers scheduler's).

  A pytree of arrays, so a jitted sampler takes it as an argument: a new step count is new data, not a
  recompile. :mod:`diffjax.pretrained.scheduler` builds one from a diffusers scheduler config.

  Attributes:
    timesteps: int32 ``[N]``; entries ``0 .. num_steps - 1`` are the increasing timesteps visited (the
      rest is padding).
    prev_timesteps: int32 ``[N]``; entry ``i`` is the timestep that step ``timesteps[i]`` moves to, or -1
      for the clean end.
    final_alpha_bar: float32 scalar; alpha-bar at the clean end (1, or diffusers' ``alphas_cumprod[0]``
      with ``set_alpha_to_one=False``).
  """

  timesteps: jnp.ndarray
  prev_timesteps: jnp.ndarray
  final_alpha_bar: jnp.ndarray


def check_num_steps(num_steps, num_timesteps: int) -> None:
  """Raises a clear error for a concrete step count outside [1, T]; traced counts pass through."""
  if isinstance(num_steps, jax.core.Tracer):
    return
  n = int(np.asarray(num_steps))
  if not 1 <= n <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}] (the schedule's T), got {n}")


def make_timesteps(*, num_timesteps: int, num_steps, spacing: str = "uniform") -> jnp.ndarray:
  """Increasing int32 timesteps of a ``num_steps``-step sampler, padded to ``[num_timesteps]``.

  Args:
    num_timesteps: T of the schedule (static).
    num_steps: number of sampling steps in [1, T]; may be a traced int.
    spacing: "uniform" (t_i = floor(i T / n), DDIM's linear subset, starts at 0), "quadratic"
      (t_i = floor((i / (n-1))^2 * 0.8 T), DDIM's quadratic subset) or "trailing"
      (t_i = round((i + 1) T / n) - 1, ends at T - 1).
  """
  if spacing not in SPACINGS:
    raise ValueError(f"spacing={spacing!r} is not one of {SPACINGS}")
  check_num_steps(num_steps, num_timesteps)
  T = num_timesteps
  n = jnp.asarray(num_steps, jnp.int32)
  i = jnp.arange(T, dtype=jnp.int32)
  if spacing == "uniform":
    ts = (i * T) // n
  elif spacing == "quadratic":
    frac = i.astype(jnp.float32) / jnp.maximum(n - 1, 1).astype(jnp.float32)
    ts = jnp.floor(jnp.square(frac * jnp.sqrt(0.8 * T))).astype(jnp.int32)
  else:
    ts = jnp.round((i + 1).astype(jnp.float32) * T / n.astype(jnp.float32)).astype(jnp.int32) - 1
  return jnp.clip(ts, 0, T - 1)
