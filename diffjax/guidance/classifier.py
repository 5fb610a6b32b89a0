"""Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier p(y | x_t, t).

"Diffusion Models Beat GANs on Image Synthesis", Sec. 4: sampling from p(x_t | y) ∝ p(x_t) p(y | x_t)^w
needs the classifier's gradient ``g = grad_{x_t} log p(y | x_t, t)`` (through ``jax.grad``), scaled by
the guidance weight w:

* **DDPM** (their Algorithm 1): the reverse mean shifts by ``w Σ g``, Σ the reverse variance;
  :func:`classifier_mean_shift` is the ``mean_shift_fn`` hook of
  :func:`diffjax.samplers.ddpm_sample`.
* **DDIM** (their Algorithm 2, any eps-reading sampler): the noise prediction shifts,
  ``eps' = eps - w sqrt(1 - ᾱ_t) g``; :func:`classifier_guidance` is this as a ``model_fn``
  transformation, so DDIM, DPM-Solver++ and DDPM itself can use it unchanged.

The base model can be unconditional (its ``cond`` is ``None``): the class comes only from the
classifier. w is a scalar or one value per sample (``[B]``); w = 0 is unguided sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax import diffusion
from diffjax.losses import ModelFn
from diffjax.schedules import Schedule

__all__ = ["classifier_grad", "classifier_guidance", "classifier_mean_shift", "per_sample_scale"]

ClassifierFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def per_sample_scale(w, batch: int, ndim: int, name: str = "guidance_scale") -> jnp.ndarray:
  """A scalar or ``[B]`` guidance weight as an array broadcastable against ``[B, ...]`` (rank ``ndim``).

  Raises:
      ValueError: Naming ``name`` when ``w`` is neither a scalar nor shaped ``[batch]``.
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim == 0:
    return w
  if w.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or shaped [B]=({batch},), got shape {w.shape}")
  return w.reshape((batch,) + (1,) * (ndim - 1))


def classifier_grad(classifier_fn: ClassifierFn, classifier_params, x_t, t, labels) -> jnp.ndarray:
  """``grad_{x_t} log p(labels | x_t, t)``, one gradient per sample.

  Args:
      classifier_fn: ``(params, x_t, t) -> logits [B, K]``.
      classifier_params: Its parameters.
      x_t: ``[B, H, W, C]``.
      t: ``[B]`` int timesteps.
      labels: ``[B]`` int classes in ``[0, K)``.

  Returns:
      ``[B, H, W, C]`` float32. The classifier treats samples independently, so the gradient of the
      batch sum of log-probabilities is each sample's own gradient.

  Raises:
      ValueError: If ``labels`` is not ``[B]`` integers.
  """
  labels = jnp.asarray(labels)
  if labels.shape != (x_t.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be [B]=({x_t.shape[0]},) integers, got {labels.dtype}{labels.shape}")

  def total_log_prob(x):
    logits = classifier_fn(classifier_params, x, t).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

  return jax.grad(total_log_prob)(x_t.astype(jnp.float32))


def classifier_guidance(
  model_fn: ModelFn,
  *,
  classifier_fn: ClassifierFn,
  classifier_params,
  schedule: Schedule,
  guidance_scale,
  base_cond: Callable[[jnp.ndarray], Any] = lambda labels: None,
  prediction: str = "eps",
) -> ModelFn:
  """Classifier guidance as a ``model_fn`` transformation: ``eps' = eps - w sqrt(1 - ᾱ_t) grad log p(y | x_t)``.

  Args:
      model_fn: The base denoiser ``(params, x_t, t, cond) -> prediction``.
      classifier_fn: ``(classifier_params, x_t, t) -> logits``.
      classifier_params: Closed over; build the guided function inside the jitted sampler so they
          (and w) are traced rather than baked-in constants.
      schedule: The diffusion schedule (for ᾱ_t).
      guidance_scale: w, a scalar or ``[B]``.
      base_cond: Maps the target labels to the base model's condition (default ``None``: an
          unconditional model; ``lambda y: y`` guides a class-conditional one further).
      prediction: The base model's parameterisation ("eps", "x0" or "v"); the output is returned in it.

  Returns:
      ``guided(params, x_t, t, labels) -> prediction``: the condition of the guided function is the
      ``[B]`` target classes.

  Raises:
      ValueError: When called with a ``guidance_scale`` that is neither a scalar nor ``[B]``.
  """
  diffusion.check_prediction(prediction)

  def guided(params, x_t, t, labels):
    b, nd = x_t.shape[0], x_t.ndim
    w = per_sample_scale(guidance_scale, b, nd)
    out = model_fn(params, x_t, t, base_cond(labels))
    x0, eps = diffusion.to_x0_eps(schedule=schedule, prediction=prediction, x_t=x_t, t=t, output=out)
    grad = classifier_grad(classifier_fn, classifier_params, x_t, t, labels)
    sigma = diffusion.gather(jnp.sqrt(1.0 - schedule.alphas_cumprod), t, nd)
    eps = eps - (w * sigma * grad).astype(eps.dtype)
    if prediction == "eps":
      return eps
    x0 = diffusion.x0_from_eps(schedule=schedule, x_t=x_t, t=t, eps=eps)
    if prediction == "x0":
      return x0
    return diffusion.v_from_eps_x0(schedule=schedule, t=t, eps=eps, x0=x0)

  return guided


def classifier_mean_shift(
  *, classifier_fn: ClassifierFn, classifier_params, labels, guidance_scale
) -> Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """The DDPM mean shift ``w Σ grad log p(y | x_t, t)`` (Dhariwal & Nichol 2021, Algorithm 1).

  Args:
      classifier_fn: ``(classifier_params, x_t, t) -> logits``.
      classifier_params: Its parameters.
      labels: ``[B]`` target classes.
      guidance_scale: w, a scalar or ``[B]``.

  Returns:
      ``shift(x_t, t, variance) -> [B, H, W, C]`` for ``ddpm_sample(..., mean_shift_fn=shift)``, where
      ``variance`` is the reverse variance Σ_t broadcastable against ``x_t``.
  """

  def shift(x_t, t, variance):
    w = per_sample_scale(guidance_scale, x_t.shape[0], x_t.ndim)
    grad = classifier_grad(classifier_fn, classifier_params, x_t, t, labels)
    return (w * variance * grad).astype(x_t.dtype)

  return shift
