"""The reverse-time loop shared by every sampler: one ``lax.fori_loop`` under ``jit``.

A step function ``step_fn(x, t, t_prev, key) -> x_prev`` moves the sample from timestep ``t`` to
``t_prev`` (``t_prev = -1`` means the clean end, where alpha-bar is 1). The loop visits the first
``num_steps`` entries of ``timesteps`` from the largest down, with ``key = fold_in(key, j)`` at loop
iteration ``j``; ``num_steps`` may be traced, so a new step count does not recompile. The state ``x``
may be any pytree (e.g. a multistep solver's sample together with its history) that ``step_fn`` returns
with the same structure.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]


def reverse_loop(
  *,
  step_fn: StepFn,
  x_T: jnp.ndarray,
  timesteps: jnp.ndarray,
  num_steps,
  key: jax.Array,
  prev_timesteps: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """Runs ``step_fn`` from ``timesteps[num_steps - 1]`` down to ``timesteps[0]`` and then to -1.

  ``prev_timesteps`` (optional, shaped like ``timesteps``) overrides where entry ``i`` steps to (``-1`` =
  the clean end) instead of the next smaller entry; diffusers' ``DDIMScheduler`` steps ``t`` to
  ``t - T // num_steps`` whatever the spacing (see :class:`~diffjax.samplers.timesteps.TimestepTable`).
  """
  n = jnp.asarray(num_steps, jnp.int32)

  def body(j, x):
    i = n - 1 - j
    t = timesteps[i]
    if prev_timesteps is None:
      t_prev = jnp.where(i > 0, timesteps[jnp.maximum(i - 1, 0)], -1)
    else:
      t_prev = prev_timesteps[i]
    return step_fn(x, t, t_prev, jax.random.fold_in(key, j))

  return jax.lax.fori_loop(0, n, body, x_T)


def alpha_bar_at(alphas_cumprod: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """alpha-bar_t with the convention alpha-bar_{-1} = 1 (t may be -1)."""
  return jnp.where(t >= 0, alphas_cumprod[jnp.maximum(t, 0)], 1.0)
