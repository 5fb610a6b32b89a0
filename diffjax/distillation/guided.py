"""Guided distillation (Meng et al. 2023): one forward pass per step for any classifier-free guidance weight.

Classifier-free guidance runs the model twice per step (conditional and null class) and combines the two
as u + w (c - u). Stage one trains a student that takes w as an input (a Fourier embedding of w added to
the time embedding, :class:`~diffjax.models.guidance_embedding.GuidanceEmbedding`) to regress the
teacher's combined output, for w drawn uniformly from [w_min, w_max] and t uniformly from all T timesteps:

  L = E_{x, eps, t, w} max(SNR_t, 1) || x_student(z_t, t, y, w) - x_cfg(z_t, t, y, w) ||^2,

in x space, whatever the parameterisation (the combination is affine, so combining v or x is the same).
Stage two is progressive distillation (:mod:`.progressive`) of that student, with w drawn afresh for every
example and passed to both the teacher (the previous student) and the student. The student starts as a
copy of the teacher plus a zero-initialised w embedding, i.e. as the conditional teacher (w = 1) for
every w. Weights follow diffusers' convention: w = 1 is the conditional model, w = 0 the unconditional one.

References:
  Meng, Rombach, Gao, Kingma, Ermon, Ho & Salimans 2023, "On Distillation of Guided Diffusion Models",
    CVPR, arXiv:2210.03142, Sec. 3.1 (stage one) and 3.2 (stage two).
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffjax import diffusion
from diffjax.distillation.progressive import apply_gradients, x_space_loss
from diffjax.guidance import classifier_free_guidance
from diffjax.losses import ModelFn
from diffjax.schedules import Schedule
from diffjax.training.state import TrainState

GUIDANCE_KEY = "guidance_embedding"


def make_guided_model_fn(model: nn.Module, *, train: bool = False, dropout_key: jax.Array | None = None):
  """``model_fn(params, x_t, t, cond)`` of a w-conditioned U-Net; ``cond = {"label": [B] int, "w": [B]}``."""
  rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None

  def model_fn(params, x_t, t, cond):
    return model.apply({"params": params}, x_t, t, cond["label"], train=train, rngs=rngs, guidance=cond["w"])

  return model_fn


def sample_guidance(key: jax.Array, *, batch_size: int, w_min: float, w_max: float) -> jnp.ndarray:
  """Guidance weights ``[batch_size]`` drawn uniformly from [w_min, w_max]."""
  return jax.random.uniform(key, (batch_size,), jnp.float32, w_min, w_max)


def guided_cond_fn(*, w_min: float, w_max: float) -> Callable:
  """``(batch, key) -> {"label", "w"}``: the batch's labels with one fresh w per example."""

  def cond_fn(batch, key):
    labels = batch["label"]
    return {"label": labels, "w": sample_guidance(key, batch_size=labels.shape[0], w_min=w_min, w_max=w_max)}

  return cond_fn


def guided_distillation_loss(
  *,
  student_fn: ModelFn,
  student_params,
  teacher_fn: ModelFn,
  teacher_params,
  schedule: Schedule,
  x0: jnp.ndarray,
  labels: jnp.ndarray,
  w: jnp.ndarray,
  key: jax.Array,
  null_label: int,
  student_prediction: str = "v",
  teacher_prediction: str = "v",
  weighting: str = "truncated_snr",
):
  """Stage one: regress the teacher's classifier-free-guided prediction at weight w (Meng et al., Eq. 6).

  Args:
    student_fn: ``(params, z, t, {"label", "w"}) -> prediction``.
    teacher_fn: ``(params, z, t, labels) -> prediction`` of the class-conditional teacher.
    x0: data ``[B, H, W, C]``; labels: int ``[B]``; w: guidance weights ``[B]``.
    key: PRNG key for t (uniform over all T) and the noise.
    null_label: the teacher's null class.
    weighting: x-space weight (see :func:`~diffjax.distillation.progressive.x_space_weight`).

  Returns:
    (loss, per_example_loss ``[B]``).
  """
  k_t, k_n = jax.random.split(key)
  t = diffusion.sample_timesteps(k_t, batch_size=x0.shape[0], num_timesteps=schedule.num_timesteps)
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  z_t = diffusion.q_sample(schedule=schedule, x0=x0, t=t, noise=noise)
  guided = classifier_free_guidance(teacher_fn, guidance_scale=w, null_cond=jnp.full_like(labels, null_label))
  out = guided(teacher_params, z_t, t, labels).astype(jnp.float32)
  x_target, _ = diffusion.to_x0_eps(
    schedule=schedule, prediction=teacher_prediction, x_t=z_t, t=t, output=out
  )
  student_out = student_fn(student_params, z_t, t, {"label": labels, "w": w})
  return x_space_loss(
    schedule=schedule,
    student_out=student_out,
    prediction=student_prediction,
    z_t=z_t,
    t=t,
    x_target=jax.lax.stop_gradient(x_target),
    weighting=weighting,
  )


def make_guided_step(
  *,
  student_fn: Callable[[jax.Array], ModelFn],
  teacher_fn: ModelFn,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  null_label: int,
  w_min: float = 0.0,
  w_max: float = 4.0,
  student_prediction: str = "v",
  teacher_prediction: str = "v",
  weighting: str = "truncated_snr",
  ema_decay: float = 0.0,
) -> Callable:
  """Builds ``step(state, batch, key, teacher_params) -> (state, metrics)`` of stage one.

  ``student_fn`` maps a dropout key to the student's training ``model_fn``; the per-step key is
  ``fold_in(key, state.step)``.
  """
  if not 0.0 <= w_min <= w_max:
    raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")

  def step(state: TrainState, batch: dict, key: jax.Array, teacher_params):
    key = jax.random.fold_in(key, state.step)
    k_w, k_loss, k_dropout = jax.random.split(key, 3)
    labels = batch["label"]
    w = sample_guidance(k_w, batch_size=labels.shape[0], w_min=w_min, w_max=w_max)
    model_fn = student_fn(k_dropout)

    def loss_fn(params):
      loss, _ = guided_distillation_loss(
        student_fn=model_fn,
        student_params=params,
        teacher_fn=teacher_fn,
        teacher_params=teacher_params,
        schedule=schedule,
        x0=batch["image"],
        labels=labels,
        w=w,
        key=k_loss,
        null_label=null_label,
        student_prediction=student_prediction,
        teacher_prediction=teacher_prediction,
        weighting=weighting,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, loss=loss, grads=grads, tx=tx, ema_decay=ema_decay)

  return step


def init_guided_student(
  *, student_model: nn.Module, teacher_params, key: jax.Array, image_shape: Sequence[int]
):
  """Parameters of a w-conditioned student: the teacher's, plus a freshly initialised w embedding.

  The embedding's output layer is zero, so the student's prediction equals the conditional teacher's
  for every w.

  Args:
    student_model: the teacher's U-Net configuration with ``guidance_embedding=True``.
    teacher_params: the class-conditional teacher's parameters.
    key: PRNG key of the embedding's first layer.
    image_shape: (H, W, C).

  Raises:
    ValueError: if the student's tree is not the teacher's plus ``guidance_embedding``.
  """
  if not getattr(student_model, "guidance_embedding", False):
    raise ValueError("the guided student needs a model with guidance_embedding=True")
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  label = jnp.zeros((1,), jnp.int32)
  fresh = student_model.init({"params": key}, x, t, label, guidance=jnp.ones((1,)))["params"]
  extra = set(fresh) - set(teacher_params)
  if extra != {GUIDANCE_KEY} or set(teacher_params) - set(fresh):
    raise ValueError(
      f"student and teacher parameter trees differ beyond {GUIDANCE_KEY!r}: "
      f"{sorted(set(fresh) ^ set(teacher_params))}"
    )
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  teacher_part = {k: v for k, v in fresh.items() if k != GUIDANCE_KEY}
  if shapes(teacher_part) != shapes(dict(teacher_params)):
    raise ValueError("the student's U-Net configuration does not match the teacher's parameter shapes")
  return {**jax.tree.map(jnp.copy, dict(teacher_params)), GUIDANCE_KEY: fresh[GUIDANCE_KEY]}
