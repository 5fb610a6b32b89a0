"""Text-to-image generation: one jitted function with classifier-free guidance against the empty prompt.

``make_text_generate`` returns ``generate(params, key, cond, num_steps=50, guidance=4.0, eta=0.0)``
where ``cond`` is the ``(tokens, mask)`` pair of :mod:`diffjax.text_conditioning`; the step count,
guidance weight and eta are traced (a new value does not recompile). Guidance (Ho & Salimans 2022) runs
the prompt and the empty prompt ``""`` in one batch: ``uncond + w * (cond - uncond)``. With a
:class:`~diffjax.latent.LatentCodec` the sampler starts from latent noise and the images are decoded
(latent diffusion, Rombach et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.guidance import classifier_free_guidance
from diffjax.latent import LatentCodec, latent_sampler
from diffjax.samplers import SAMPLERS, ddim_sample, ddpm_sample, dpm_solver_sample
from diffjax.samplers.timesteps import check_num_steps
from diffjax.schedules import Schedule

__all__ = ["make_text_generate"]


def make_text_generate(
  *,
  model_fn: Callable,
  schedule: Schedule,
  sample_shape: Sequence[int],
  null_cond: tuple[Any, Any],
  sampler: str = "ddim",
  prediction: str = "eps",
  spacing: str | None = None,
  variance: str = "small",
  codec: LatentCodec | None = None,
) -> Callable:
  """Builds ``generate(params, key, cond, num_steps=50, guidance=4.0, eta=0.0) -> [B, H, W, C]``.

  Args:
      model_fn: ``(params, x_t, t, cond=(tokens, mask)) -> prediction`` (see
          :func:`diffjax.text_conditioning.make_text_model_fn`).
      schedule: The training schedule.
      sample_shape: ``(h, w, c)`` of what the sampler denoises (latents with ``codec``, else images).
      null_cond: The empty prompt's condition, leaves ``[1, L, ...]``.
      sampler: ``"ddim"``, ``"ddpm"`` (all T steps; ``num_steps`` and ``eta`` ignored) or
          ``"dpm_solver++"`` (``eta`` ignored).
      prediction: The model's parameterisation.
      spacing: Timestep spacing; ``None`` picks ``"uniform"`` for DDIM, ``"trailing"`` for DPM-Solver++.
      variance: DDPM reverse variance.
      codec: Decode sampled latents with this autoencoder (no ``x0`` clipping then); ``None`` for pixel
          space (``x0`` clipped to ``[-1, 1]``).

  Returns:
      ``generate``: ``cond`` leaves are ``[B, L, ...]`` (NumPy or JAX), ``guidance`` a scalar or ``[B]``
      (w = 1: the conditional model; w = 0: the unconditional one). Images are float32 in about
      ``[-1, 1]``.

  Raises:
      ValueError: On an unknown sampler (at build time) or bad ``num_steps`` / ``cond`` (wrong shapes, an
          empty batch; at call time).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
  if spacing is None:
    spacing = "trailing" if sampler == "dpm_solver++" else "uniform"
  sample_shape = tuple(int(v) for v in sample_shape)
  null_cond = jax.tree.map(jnp.asarray, tuple(null_cond))
  base = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpm_solver++": dpm_solver_sample}[sampler]

  @jax.jit
  def generate(params, codec, key, cond, num_steps, guidance, eta):
    b = cond[0].shape[0]
    null = jax.tree.map(lambda n: jnp.broadcast_to(n, (b, *n.shape[1:])), null_cond)
    guided = classifier_free_guidance(model_fn, guidance_scale=guidance, null_cond=null)
    run = base if codec is None else latent_sampler(base, codec=codec)
    kwargs = {
      "model_fn": guided,
      "params": params,
      "schedule": schedule,
      "cond": cond,
      "prediction": prediction,
    }
    if sampler == "ddpm":
      kwargs["variance"] = variance
    else:
      kwargs.update(num_steps=num_steps, spacing=spacing)
    if sampler == "ddim":
      kwargs["eta"] = eta
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (b, *sample_shape), jnp.float32)
    return run(x_T=x_T, key=jax.random.fold_in(key, 1), **kwargs)

  def checked(params, key, cond, num_steps=50, guidance=4.0, eta=0.0):
    tokens, mask = (jnp.asarray(c) for c in cond)
    if tokens.ndim < 2 or mask.shape != tokens.shape[:2] or mask.shape[1:] != null_cond[1].shape[1:]:
      raise ValueError(
        f"cond must be (tokens [B, L, ...], mask [B, L]) with L={null_cond[1].shape[1]}, got "
        f"{tokens.shape} and {mask.shape}"
      )
    if tokens.shape[0] < 1:
      raise ValueError("cond holds an empty batch of prompts: need at least one (B >= 1)")
    if sampler != "ddpm":
      check_num_steps(num_steps, schedule.num_timesteps)
    return generate(
      params,
      codec,
      key,
      (tokens.astype(null_cond[0].dtype), mask.astype(null_cond[1].dtype)),
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(eta, jnp.float32),
    )

  return checked
