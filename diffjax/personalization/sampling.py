"""Subject-conditioned generation (FastComposer) in one jitted function, with delayed conditioning.

``make_subject_generate`` returns ``generate(params, key, cond, refs, positions, valid, num_steps=50,
guidance=4.0, delay=0.2, eta=0.0)``: the references are encoded and fused into the prompt's context
once, then the sampler runs with classifier-free guidance against the empty prompt (Ho & Salimans 2022)
and delayed subject conditioning (Xiao et al. 2023, Sec. 3.4): the text-only context while
``t >= (1 - delay) T``, the subject-augmented context afterwards. Step count, guidance weight, delay and
eta are traced (new values do not recompile). DreamBooth needs nothing new: its fine-tuned parameters
sample with :func:`diffjax.text_sampling.make_text_generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.guidance import classifier_free_guidance
from diffjax.latent import LatentCodec, latent_sampler
from diffjax.models.subject_encoder import SubjectEncoder, SubjectFuser
from diffjax.personalization.fastcomposer import delay_switch_timestep, delayed_context
from diffjax.personalization.fastcomposer_step import subject_context
from diffjax.samplers import ddim_sample, dpm_solver_sample
from diffjax.samplers.timesteps import check_num_steps
from diffjax.schedules import Schedule

__all__ = ["make_subject_generate"]

_SAMPLERS = {"ddim": ddim_sample, "dpm_solver++": dpm_solver_sample}


def make_subject_generate(
  *,
  unet: nn.Module,
  encoder: SubjectEncoder,
  fuser: SubjectFuser,
  schedule: Schedule,
  sample_shape: Sequence[int],
  null_cond: tuple[Any, Any],
  prediction: str = "eps",
  sampler: str = "ddim",
  spacing: str = "uniform",
  codec: LatentCodec | None = None,
) -> Callable:
  """Builds the FastComposer sampler.

  Args:
      unet: The fine-tuned cross-attention U-Net (``params["unet"]``).
      encoder: Subject encoder (``params["encoder"]``).
      fuser: Fusion MLP (``params["fuser"]``).
      schedule: The training schedule.
      sample_shape: ``(h, w, c)`` of what is diffused.
      null_cond: The empty prompt's ``(context [1, L, D], mask [1, L])``.
      prediction: The model's parameterisation.
      sampler: ``"ddim"`` or ``"dpm_solver++"`` (``eta`` ignored).
      spacing: Timestep spacing (delayed conditioning counts steps exactly with ``"uniform"``).
      codec: Decode latents with this autoencoder; ``None`` for pixel space.

  Returns:
      ``generate(params, key, cond, refs, positions, valid, num_steps=50, guidance=4.0, delay=0.2,
      eta=0.0) -> float32 [B, H, W, C]`` with ``cond = (context [B, L, D], mask [B, L])`` the text-only
      condition, ``refs [B, N, r, r, C]`` in ``[-1, 1]``, ``positions int [B, N]`` and ``valid [B, N]``
      (0 leaves a subject word as text).

  Raises:
      ValueError: On an unknown sampler (at build time) or malformed inputs (at call time).
  """
  if sampler not in _SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not one of {tuple(_SAMPLERS)}")
  sample_shape = tuple(int(v) for v in sample_shape)
  null_ctx, null_mask = (jnp.asarray(n) for n in null_cond)
  base = _SAMPLERS[sampler]
  num_timesteps = schedule.num_timesteps

  @jax.jit
  def generate(params, codec, key, cond, refs, positions, valid, num_steps, guidance, delay, eta):
    text, mask = cond
    b = text.shape[0]
    subject = subject_context(
      params, encoder=encoder, fuser=fuser, context=text, refs=refs, positions=positions, valid=valid
    )
    stacked = jnp.stack([text, subject], axis=2)  # [B, L, 2, D]: both contexts travel as one condition
    null = (
      jnp.broadcast_to(null_ctx[:, :, None], (b, null_ctx.shape[1], 2, null_ctx.shape[2])),
      jnp.broadcast_to(null_mask, (b, null_mask.shape[1])),
    )
    switch_t = delay_switch_timestep(delay, num_timesteps)

    def model_fn(p, x_t, t, c):
      contexts, m = c
      ctx = delayed_context(contexts[:, :, 0], contexts[:, :, 1], t, switch_t)
      return unet.apply({"params": p["unet"]}, x_t, t, ctx, m)

    guided = classifier_free_guidance(model_fn, guidance_scale=guidance, null_cond=null)
    run = base if codec is None else latent_sampler(base, codec=codec)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (b, *sample_shape), jnp.float32)
    return run(
      model_fn=guided,
      params=params,
      schedule=schedule,
      x_T=x_T,
      key=jax.random.fold_in(key, 1),
      cond=(stacked, mask),
      prediction=prediction,
      num_steps=num_steps,
      spacing=spacing,
      **kwargs,
    )

  def checked(params, key, cond, refs, positions, valid, num_steps=50, guidance=4.0, delay=0.2, eta=0.0):
    text, mask = (jnp.asarray(c) for c in cond)
    if text.ndim != 3 or mask.shape != text.shape[:2] or mask.shape[1] != null_mask.shape[1]:
      raise ValueError(
        f"cond must be (context [B, L, D], mask [B, L]) with L={null_mask.shape[1]}, got {text.shape}, {mask.shape}"
      )
    positions, valid, refs = (
      jnp.asarray(positions, jnp.int32),
      jnp.asarray(valid, jnp.float32),
      jnp.asarray(refs),
    )
    if positions.ndim != 2 or positions.shape[0] != text.shape[0] or valid.shape != positions.shape:
      raise ValueError(
        f"positions and valid must both be [B={text.shape[0]}, N], got {positions.shape}, {valid.shape}"
      )
    if not 0.0 <= float(delay) <= 1.0:
      raise ValueError(f"delay must be a fraction in [0, 1], got {delay}")
    check_num_steps(num_steps, num_timesteps)
    return generate(
      params,
      codec,
      key,
      (text.astype(null_ctx.dtype), mask.astype(null_mask.dtype)),
      refs.astype(jnp.float32),
      positions,
      valid,
      jnp.asarray(num_steps, jnp.int32),
      jnp.asarray(guidance, jnp.float32),
      jnp.asarray(delay, jnp.float32),
      jnp.asarray(eta, jnp.float32),
    )

  return checked
