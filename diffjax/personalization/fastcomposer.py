"""FastComposer's math: subject fusion, the cross-attention localization loss, delayed conditioning.

FastComposer (Xiao et al. 2023, "FastComposer: Tuning-Free Multi-Subject Image Generation with Localized
Attention") personalises without per-subject fine-tuning:

* **Fusion** (Sec. 3.2): each subject's reference image is encoded into one embedding ``v_j``
  (:class:`~diffjax.models.subject_encoder.SubjectEncoder`) and the text condition at the subject's
  word ``c_i`` is replaced by ``MLP([c_i ; v_j])`` (:class:`~diffjax.models.subject_encoder.SubjectFuser`),
  :func:`fuse_subjects`. The text encoder's outputs for the other words are unchanged, so a frozen
  encoder's contexts can still be computed once on the host.
* **Localization** (Sec. 3.3): without supervision, a subject's token attends all over the image and
  two subjects blend. Training adds the balanced L1 loss between the mean cross-attention probability of
  the subject token *outside* and *inside* the subject's segmentation mask,
  ``L_loc = mean_j [ mean_{p not in M_j} A_j(p) - mean_{p in M_j} A_j(p) ]``, averaged over heads, chosen
  layers and subjects (:func:`localization_loss`, :func:`balanced_l1`), with the masks resized to each
  layer's resolution (area average, soft at the edges, as the authors' antialiased resize).
* **Delayed subject conditioning** (Sec. 3.4): the subject embeddings fix identity, the text fixes
  layout; augmenting the context from the first step lets the subjects override the prompt (the
  reference's pose is copied). Sampling therefore uses the text-only context for the first ``delay``
  fraction of the steps and the subject-augmented one afterwards (:func:`delayed_context`).

The cross-attention maps come from the recording API of :mod:`diffjax.models.attention_control`: the
U-Net applied with ``mutable=[ATTENTION_MAPS]`` returns every cross-attention layer's probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

__all__ = [
  "balanced_l1",
  "delay_switch_timestep",
  "delayed_context",
  "fuse_subjects",
  "localization_loss",
  "resize_masks",
]


def fuse_subjects(
  fuse_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
  *,
  context: jnp.ndarray,
  subjects: jnp.ndarray,
  positions: jnp.ndarray,
  valid: jnp.ndarray,
) -> jnp.ndarray:
  """Replaces the context at each subject word by the fusion of its text and image embeddings.

  Args:
      fuse_fn: ``(text [..., D], subject [..., E]) -> [..., D]`` (e.g. a bound ``SubjectFuser``).
      context: ``[B, L, D]`` text-encoder outputs.
      subjects: ``[B, N, E]`` subject embeddings.
      positions: ``int [B, N]`` token index of each subject's word.
      valid: ``[B, N]``, nonzero where subject ``j`` of example ``b`` is given (its word keeps the text
          embedding otherwise).

  Returns:
      ``[B, L, D]`` (``context``'s dtype).

  Raises:
      ValueError: If the shapes disagree.
  """
  b, _length, _ = context.shape
  if subjects.ndim != 3 or subjects.shape[0] != b or positions.shape != subjects.shape[:2]:
    raise ValueError(
      f"subjects must be [B={b}, N, E] and positions [B, N], got {subjects.shape} and {positions.shape}"
    )
  if valid.shape != positions.shape:
    raise ValueError(f"valid must be [B, N] = {positions.shape}, got {valid.shape}")
  rows = jnp.arange(b)[:, None]
  text = context[rows, positions]  # [B, N, D]
  fused = fuse_fn(text, subjects).astype(context.dtype)
  new = jnp.where(valid[..., None] != 0, fused, text)
  # Scatter one subject at a time: two subjects never share a word, and a later write must not undo
  # an earlier one when N > 1.
  out = context
  for j in range(positions.shape[1]):
    out = out.at[jnp.arange(b), positions[:, j]].set(new[:, j])
  return out


def resize_masks(masks: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Soft masks at another resolution: area average when shrinking by an integer factor, else linear.

  Args:
      masks: ``[B, N, H, W]`` float masks in ``[0, 1]``.
      size: ``(h, w)``.

  Returns:
      float32 ``[B, N, h, w]``.
  """
  b, n, hh, ww = masks.shape
  h, w = size
  m = masks.astype(jnp.float32)
  if (hh, ww) == (h, w):
    return m
  if hh % h == 0 and ww % w == 0:
    return m.reshape(b, n, h, hh // h, w, ww // w).mean(axis=(3, 5))
  return jax.image.resize(m, (b, n, h, w), method="linear", antialias=True)


def balanced_l1(probs: jnp.ndarray, masks: jnp.ndarray, *, eps: float = 1e-5) -> jnp.ndarray:
  """Mean attention outside minus mean attention inside each mask (FastComposer's balanced L1 loss).

  Args:
      probs: ``[B, heads, P, N]`` attention probability of each of ``P`` image positions to each
          subject's token.
      masks: ``[B, N, P]`` soft masks of the subjects.
      eps: Keeps empty masks finite.

  Returns:
      float32 ``[B, heads, N]``, in ``[-1, 1]``: low when the token's attention lies inside its mask.
  """
  m = jnp.swapaxes(masks.astype(jnp.float32), 1, 2)[:, None]  # [B, 1, P, N]
  p = probs.astype(jnp.float32)
  inside = jnp.sum(p * m, axis=2) / (jnp.sum(m, axis=2) + eps)
  outside = jnp.sum(p * (1.0 - m), axis=2) / (jnp.sum(1.0 - m, axis=2) + eps)
  return outside - inside


def localization_loss(
  maps: Mapping[str, jnp.ndarray],
  *,
  masks: jnp.ndarray,
  positions: jnp.ndarray,
  valid: jnp.ndarray,
  layers: Callable[[str], bool] | None = None,
) -> jnp.ndarray:
  """FastComposer's cross-attention localization loss, averaged over layers, heads and given subjects.

  Args:
      maps: Layer path to cross-attention probabilities ``[B, heads, h, w, S]`` (e.g.
          :func:`diffjax.models.attention_control.cross_attention_maps` of a sown collection).
      masks: ``[B, N, H, W]`` subject masks at any resolution (resized per layer by
          :func:`resize_masks`).
      positions: ``int [B, N]`` token of each subject's word.
      valid: ``[B, N]``, nonzero for subjects that count (subjects not given, e.g. dropped in training,
          are left out).
      layers: Predicate on layer paths choosing the layers (``None``: all).

  Returns:
      float32 scalar: per example, the balanced L1 summed over valid subjects divided by their count,
      then the mean over examples, heads and layers (0 for an example without subjects).

  Raises:
      ValueError: If no layer is chosen or a layer's maps are not ``[B, heads, h, w, S]``.
  """
  chosen = [(k, v) for k, v in maps.items() if layers is None or layers(k)]
  if not chosen:
    raise ValueError(f"the layer predicate chooses none of the layers {list(maps)}")
  b, n = positions.shape
  weight = (valid != 0).astype(jnp.float32)  # [B, N]
  count = jnp.sum(weight, axis=1) + 1e-5
  total = jnp.zeros((), jnp.float32)
  for name, probs in chosen:
    if probs.ndim != 5 or probs.shape[0] != b:
      raise ValueError(f"layer {name!r} maps must be [B={b}, heads, h, w, S], got {probs.shape}")
    _, heads, h, w, s = probs.shape
    flat = probs.reshape(b, heads, h * w, s)
    idx = jnp.broadcast_to(positions[:, None, None, :], (b, heads, h * w, n))
    token = jnp.take_along_axis(flat, idx, axis=3)  # [B, heads, P, N]
    m = resize_masks(masks, (h, w)).reshape(b, n, h * w)
    per = balanced_l1(token, m) * weight[:, None, :]  # [B, heads, N]
    total = total + jnp.mean(jnp.sum(per, axis=2) / count[:, None])
  return total / len(chosen)


def delay_switch_timestep(delay, num_timesteps: int) -> jnp.ndarray:
  """The timestep from which on (downwards) the subject-augmented context is used: ``(1 - delay) T``.

  With uniformly spaced sampler steps ``t_i = i T / n``, ``t >= (1 - delay) T`` holds for exactly the
  first ``delay * n`` steps of sampling (the noisiest ones), which get the text-only context.

  Args:
      delay: Fraction in ``[0, 1]`` (may be traced); 0 augments every step.
      num_timesteps: ``T``.

  Returns:
      float32 scalar.
  """
  return (1.0 - jnp.asarray(delay, jnp.float32)) * num_timesteps


def delayed_context(text: jnp.ndarray, subject: jnp.ndarray, t: jnp.ndarray, switch_t) -> jnp.ndarray:
  """The context of delayed subject conditioning at timesteps ``t``.

  Args:
      text: ``[B, L, D]`` text-only context.
      subject: ``[B, L, D]`` subject-augmented context.
      t: ``[B]`` timesteps.
      switch_t: Scalar from :func:`delay_switch_timestep`; with ``delay = 0`` it is ``T`` and every
          step is augmented.

  Returns:
      ``[B, L, D]``: ``text`` where ``t >= switch_t`` (early, noisy steps), else ``subject``.
  """
  early = jnp.asarray(t).astype(jnp.float32) >= switch_t
  return jnp.where(early.reshape(-1, 1, 1), text, subject)
