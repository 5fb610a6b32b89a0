"""Prompt-to-prompt editing (Hertz et al. 2022): the source and the edited prompt in one jitted DDIM run.

"Prompt-to-Prompt Image Editing with Cross Attention Control" edits a generated image by editing its
prompt: the edited prompt is sampled from the same noise while its attention maps are tied to the source
run's, so the layout and everything the changed words do not own stay put (Sec. 3):

* **cross-attention replacement** for the first ``cross_replace`` fraction of the steps: the edited run
  attends with the source run's cross-attention maps, carried over to its own tokens by a
  :class:`~diffjax.editing.token_alignment.TokenAlignment` (word swap or refinement; Eq. 3-4 and Sec. 3.2);
* **self-attention injection** for the first ``self_replace`` fraction (the authors' code injects the
  source's self-attention maps in the layers with at most 16x16 query tokens; ``self_max_tokens``);
* **reweighting**: the edited run's (mapped) cross-attention to chosen tokens is scaled (Sec. 3.2,
  "Attention Re-weighting");
* **local blend** (the authors' ``LocalBlend``): after each step, the edited sample keeps the source
  sample outside a mask made from the cross-attention of chosen words, summed over the steps so far,
  averaged over heads and layers, max-pooled 3x3, divided by its maximum and thresholded; the mask is the
  union of the source's and the edit's. It is applied from the ``blend_start`` fraction of the steps on,
  as in the authors' null-text inversion code (Mokady et al. 2023), which starts at 0.2.

All of it goes through the U-Net's ``attention_control`` argument (:mod:`diffjax.models.attention_control`):
:func:`prompt_to_prompt_control` builds, per step, a pure function that rewrites the edited rows'
probabilities from the source rows' in the same batch, so no maps are stored between steps except the
local blend's ``[2P, h, w]`` running sum, carried in the ``fori_loop`` with the samples.

Batch layout: ``P`` pairs; rows ``[0, P)`` are the source prompts and rows ``[P, 2P)`` the edited prompts,
pair ``p`` in rows ``p`` and ``P + p`` (same starting noise). With classifier-free guidance (Ho & Salimans
2022) the U-Net sees ``[cond rows, null rows]``; as in the authors' code only the conditional half is
controlled.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from diffjax.models.attention_control import ATTENTION_MAPS, AttentionControl, AttentionInfo, token_maps
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.loop import reverse_loop
from diffjax.samplers.timesteps import make_timesteps
from diffjax.schedules import Schedule

__all__ = [
  "BLEND_MAPS",
  "EditSpec",
  "check_fraction",
  "check_fractions",
  "in_first_steps",
  "local_blend_mask",
  "prompt_to_prompt_control",
  "prompt_to_prompt_sample",
]


@struct.dataclass
class EditSpec:
  """Per-pair arrays of a prompt-to-prompt edit (all float32, ``P`` pairs, ``L`` context tokens).

  Attributes:
      mapper: ``[P, L, L]`` token alignment of each pair (see
          :class:`~diffjax.editing.token_alignment.TokenAlignment`).
      alphas: ``[P, L]``: 1 where an edited token takes the mapped source attention, 0 where it keeps its own.
      scales: ``[P, L]`` reweighting of the edited prompt's tokens (ones: none).
      blend: ``[2P, L]`` token weights of the local blend's words, source rows then edited rows (zeros:
          no local blend).
  """

  mapper: jnp.ndarray
  alphas: jnp.ndarray
  scales: jnp.ndarray
  blend: jnp.ndarray

  @property
  def num_pairs(self) -> int:
    """``P``."""
    return int(self.mapper.shape[0])


def in_first_steps(step, fraction, num_steps) -> jnp.ndarray:
  """Whether step ``step`` (0 = first) is among the first ``floor(fraction * num_steps)`` steps.

  As the authors' ``get_time_words_attention_alpha``: a fraction f of n steps covers steps
  ``[0, int(f * n))``.
  """
  n = jnp.asarray(num_steps, jnp.float32)
  first = jnp.floor(jnp.asarray(fraction, jnp.float32) * n + 1e-4).astype(jnp.int32)
  return jnp.asarray(step, jnp.int32) < first


def prompt_to_prompt_control(
  *,
  spec: EditSpec,
  step: jnp.ndarray,
  num_steps: jnp.ndarray,
  cross_replace: jnp.ndarray | float,
  self_replace: jnp.ndarray | float,
  self_max_tokens: int | None = None,
) -> AttentionControl:
  """The attention control of one sampler step (all arguments may be traced).

  Args:
      spec: The edit's arrays.
      step: Index of the step, 0 for the first (noisiest) one.
      num_steps: Number of sampler steps.
      cross_replace: Fraction of the steps (from the first) that replace the edited rows' cross-attention.
      self_replace: Fraction of the steps that inject the source rows' self-attention.
      self_max_tokens: Inject self-attention only in layers with at most this many query tokens (the
          authors use 16x16 at Stable Diffusion's 64x64 latents); ``None``: in every layer.

  Returns:
      ``control(probs [N, heads, L_q, L_k], info) -> probs`` for a U-Net batch of ``N = copies * 2P``
      rows (``copies`` = 2 under classifier-free guidance; only the first copy is controlled).
  """
  p = spec.num_pairs
  cross_on = in_first_steps(step, cross_replace, num_steps)
  self_on = in_first_steps(step, self_replace, num_steps)

  def control(probs: jnp.ndarray, info: AttentionInfo) -> jnp.ndarray:
    n = probs.shape[0]
    if n % (2 * p):
      raise ValueError(f"attention batch of {n} rows is not a multiple of 2 x {p} pairs at {info.layer!r}")
    rows = probs.reshape(n // (2 * p), 2, p, *probs.shape[1:])
    source, own = rows[0, 0], rows[0, 1]  # [P, heads, Lq, Lk]
    if info.is_cross:
      mapped = jnp.einsum("phqs,pst->phqt", source, spec.mapper)
      alphas = spec.alphas[:, None, None, :]
      new = (mapped * alphas + own * (1.0 - alphas)) * spec.scales[:, None, None, :]
      edited = jnp.where(cross_on, new, own)
    else:
      if self_max_tokens is not None and probs.shape[2] > self_max_tokens:
        return probs
      edited = jnp.where(self_on, source, own)
    return rows.at[0, 1].set(edited).reshape(probs.shape)

  return control


BLEND_MAPS = ("lowest", "all")
"""Choices of ``blend_maps`` in :func:`prompt_to_prompt_sample`."""


def local_blend_mask(maps: jnp.ndarray, *, threshold: jnp.ndarray | float) -> jnp.ndarray:
  """The local blend's mask from accumulated word maps (the authors' ``LocalBlend``).

  Args:
      maps: ``[2P, h, w]`` summed cross-attention of the blend words, source rows then edited rows.
      threshold: In ``[0, 1]``, relative to each map's maximum after a 3x3 max-pool.

  Returns:
      float32 ``[P, h, w, 1]``: 1 where the source's or the edit's pooled map exceeds the threshold.
  """
  pooled = nn.max_pool(maps[..., None], (3, 3), strides=(1, 1), padding="SAME")[..., 0]
  peak = jnp.max(pooled, axis=(1, 2), keepdims=True)
  on = pooled > threshold * jnp.maximum(peak, jnp.finfo(jnp.float32).tiny)
  p = maps.shape[0] // 2
  return jnp.logical_or(on[:p], on[p:]).astype(jnp.float32)[..., None]


def prompt_to_prompt_sample(
  *,
  unet: nn.Module,
  params: Any,
  schedule: Schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: tuple[jnp.ndarray, jnp.ndarray],
  null_cond: tuple[jnp.ndarray, jnp.ndarray],
  spec: EditSpec,
  guidance: jnp.ndarray | float = 4.0,
  num_steps: jnp.ndarray | int = 50,
  eta: jnp.ndarray | float = 0.0,
  cross_replace: jnp.ndarray | float = 0.8,
  self_replace: jnp.ndarray | float = 0.4,
  blend: bool = False,
  blend_threshold: jnp.ndarray | float = 0.3,
  blend_start: jnp.ndarray | float = 0.2,
  blend_maps: str = "lowest",
  self_max_tokens: int | None = None,
  text_module: nn.Module | None = None,
  prediction: str = "eps",
  spacing: str = "uniform",
  clip_x0: float | None = 1.0,
) -> jnp.ndarray:
  """Samples ``P`` source prompts and their edits with DDIM under prompt-to-prompt control.

  Everything except ``unet``, ``text_module``, ``blend``, ``self_max_tokens`` and the strings may be
  traced (a new step count, guidance weight or fraction does not recompile a jitted caller).

  Args:
      unet: A :class:`~diffjax.models.unet_condition.UNetCondition`.
      params: Its parameters (``{"unet", "text_encoder"}`` with a trainable ``text_module``).
      schedule: The training schedule.
      x_T: ``[P, h, w, c]`` starting noise, shared by each pair's source and edit.
      key: PRNG key of DDIM's noise (``eta > 0``).
      cond: ``(tokens [2P, L, ...], mask [2P, L])``: the source prompts, then the edited prompts.
      null_cond: The empty prompt's ``(tokens [1, L, ...], mask [1, L])``.
      spec: The edit's arrays.
      guidance: Classifier-free guidance weight (1: the conditional model).
      num_steps: DDIM steps.
      eta: DDIM eta.
      cross_replace: Fraction of the steps with cross-attention replacement.
      self_replace: Fraction of the steps with self-attention injection.
      blend: Apply the local blend with the words of ``spec.blend`` (static).
      blend_threshold: Local blend threshold.
      blend_start: Fraction of the steps after which the local blend applies.
      blend_maps: Which cross-attention layers make the blend's maps (static): ``"lowest"`` (the
          layers at the U-Net's coarsest attention resolution; the authors' ``LocalBlend`` likewise
          averages only Stable Diffusion's 16x16 maps) or ``"all"``. On the two-digit scenes model
          all layers give a mask over most of the image (experiments/results/p2p.md: 1.7x vs 2.4x
          less change of the unedited half at threshold 0.3).
      self_max_tokens: See :func:`prompt_to_prompt_control` (static).
      text_module: The trainable text encoder when ``cond`` holds token ids, else ``None``.
      prediction: The model's parameterisation.
      spacing: DDIM timestep spacing.
      clip_x0: Clip the predicted ``x0`` (``None`` for latents).

  Returns:
      ``[2P, h, w, c]``: the source samples, then the edited samples.

  Raises:
      ValueError: If the shapes of ``x_T``, ``cond`` and ``spec`` disagree.
  """
  p = spec.num_pairs
  tokens, mask = cond
  if x_T.shape[0] != p or tokens.shape[0] != 2 * p or mask.shape != tokens.shape[:2]:
    raise ValueError(
      f"x_T must be [P={p}, ...] and cond [2P={2 * p}, L, ...] with a [2P, L] mask; got {x_T.shape}, "
      f"{tokens.shape}, {mask.shape}"
    )
  if blend_maps not in BLEND_MAPS:
    raise ValueError(f"blend_maps must be one of {BLEND_MAPS}, got {blend_maps!r}")
  if spec.blend.shape != (2 * p, mask.shape[1]) or spec.mapper.shape != (p, mask.shape[1], mask.shape[1]):
    raise ValueError(f"spec arrays do not fit {p} pairs of {mask.shape[1]} tokens")
  null = jax.tree.map(lambda v: jnp.broadcast_to(v, (2 * p, *v.shape[1:])).astype(v.dtype), tuple(null_cond))
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u.astype(c.dtype)]), (tokens, mask), null)
  unet_params = params if text_module is None else params["unet"]
  ts = make_timesteps(num_timesteps=schedule.num_timesteps, num_steps=num_steps, spacing=spacing)
  n = jnp.asarray(num_steps, jnp.int32)
  w = jnp.asarray(guidance, jnp.float32)
  h, wd = x_T.shape[1:3]

  def denoise(x, t, step):
    control = prompt_to_prompt_control(
      spec=spec,
      step=step,
      num_steps=n,
      cross_replace=cross_replace,
      self_replace=self_replace,
      self_max_tokens=self_max_tokens,
    )
    ctx, ctx_mask = both
    if text_module is not None:
      ctx = text_module.apply({"params": params["text_encoder"]}, ctx, ctx_mask)
    x_in = jnp.concatenate([x, x])
    t_in = jnp.full((x_in.shape[0],), t, jnp.int32)
    out, state = unet.apply(
      {"params": unet_params}, x_in, t_in, ctx, ctx_mask, attention_control=control, mutable=[ATTENTION_MAPS]
    )
    c, u = out[: 2 * p], out[2 * p :]
    guided = (u + w.astype(out.dtype) * (c - u)).astype(x.dtype)
    if not blend:
      return guided, None
    maps = token_maps(state[ATTENTION_MAPS], size=(h, wd), lowest_resolution=blend_maps == "lowest")
    maps = maps[: 2 * p]  # [2P, h, w, L]
    return guided, jnp.einsum("nhwl,nl->nhw", maps, spec.blend)

  def step_fn(state, t, t_prev, k):
    x, acc, step = state
    guided, maps = denoise(x, t, step)
    x_prev = ddim_step(
      model_fn=lambda *_: guided,
      params=None,
      schedule=schedule,
      x_t=x,
      t=t,
      t_prev=t_prev,
      cond=None,
      key=k,
      eta=eta,
      prediction=prediction,
      clip_x0=clip_x0,
    )
    if blend:
      acc = acc + maps
      m = local_blend_mask(acc, threshold=blend_threshold)
      src, edit = x_prev[:p], x_prev[p:]
      blended = src + m.astype(x_prev.dtype) * (edit - src)
      started = jnp.logical_not(in_first_steps(step, blend_start, n))
      x_prev = jnp.concatenate([src, jnp.where(started, blended, edit)])
    return x_prev, acc, step + 1

  x0 = jnp.concatenate([x_T, x_T])
  acc0 = jnp.zeros((2 * p, h, wd), jnp.float32)
  x, _, _ = reverse_loop(step_fn=step_fn, x_T=(x0, acc0, jnp.int32(0)), timesteps=ts, num_steps=n, key=key)
  return x


def check_fraction(value: float, name: str) -> None:
  """Raises ``ValueError`` unless ``value`` is in ``[0, 1]`` (a concrete number)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_fractions(**values: float) -> None:
  """:func:`check_fraction` of every ``name=value``, in the order given (the first bad one raises)."""
  for name, value in values.items():
    check_fraction(value, name)

