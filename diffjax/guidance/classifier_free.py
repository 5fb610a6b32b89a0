"""Classifier-free guidance (Ho & Salimans 2022) as a ``model_fn`` transformation.

Training drops the condition with probability p (replacing it by the null condition); sampling
combines the conditional and unconditional predictions as
``uncond + w * (cond - uncond)`` (diffusers' ``guidance_scale`` convention: w = 1 is the plain
conditional model, w = 0 the unconditional one). Both passes run as one batched forward. Because the
combination is affine in the model output, it is the same in eps, x0 or v space.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffjax.losses import ModelFn


def classifier_free_guidance(
  model_fn: ModelFn, *, guidance_scale, null_cond: Any, skip_unconditional_at_one: bool = False
) -> ModelFn:
  """Returns a guided ``model_fn`` that runs the conditional and null passes in one batch.

  Args:
    model_fn: ``(params, x_t, t, cond) -> prediction``.
    guidance_scale: w, a scalar or ``[B]`` array; may be traced (build the guided function inside
      the jitted sampler so a new w does not recompile).
    null_cond: the unconditional condition, a pytree shaped like ``cond`` (e.g. labels filled with
      the null class).
    skip_unconditional_at_one: with a scalar w, run only the conditional pass (half the work) when
      w == 1, chosen at run time by ``lax.cond`` when w is traced. Off by default: a ``model_fn`` that
      records per-pass state (attention control, calibration) expects both passes in every call.
  """

  def guided(params, x_t, t, cond):
    if skip_unconditional_at_one and jnp.ndim(guidance_scale) == 0:
      if not isinstance(guidance_scale, jax.core.Tracer):
        if float(guidance_scale) == 1.0:
          return model_fn(params, x_t, t, cond)
        return both_passes(params, x_t, t, cond)
      return jax.lax.cond(
        guidance_scale == 1, lambda: model_fn(params, x_t, t, cond), lambda: both_passes(params, x_t, t, cond)
      )
    return both_passes(params, x_t, t, cond)

  def both_passes(params, x_t, t, cond):
    B = x_t.shape[0]
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)
    out = model_fn(params, jnp.concatenate([x_t, x_t], 0), jnp.concatenate([t, t], 0), both)
    c, u = out[:B], out[B:]
    w = jnp.asarray(guidance_scale, out.dtype)
    if w.ndim:
      if w.shape != (B,):
        raise ValueError(f"guidance_scale must be a scalar or shaped [{B}], got shape {w.shape}")
      w = w.reshape((B,) + (1,) * (out.ndim - 1))
    return u + w * (c - u)

  return guided


def drop_labels(key: jax.Array, labels: jnp.ndarray, *, null_label: int, p: float) -> jnp.ndarray:
  """Replaces each label by ``null_label`` with probability ``p`` (condition dropout in training)."""
  drop = jax.random.bernoulli(key, p, labels.shape)
  return jnp.where(drop, null_label, labels)
