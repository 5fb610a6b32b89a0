"""Guided distillation: the w embedding, the student's initialisation and the stage-one loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.distillation import (
  guided_distillation_loss,
  init_guided_student,
  make_guided_model_fn,
  make_student_generate,
)
from diffjax.guidance import classifier_free_guidance
from diffjax.models import UNet
from diffjax.schedules import make_schedule
from diffjax.training.builders import init_params
from diffjax.training.step import make_model_fn

KW = {
  "block_out_channels": (16, 32),
  "layers_per_block": 1,
  "attention_levels": (False, True),
  "attention_head_dim": 8,
  "norm_num_groups": 4,
  "num_classes": 10,
}
SCHEDULE = make_schedule("linear", num_timesteps=100)
SHAPE = (8, 8, 1)


def _perturbed(params, key, scale=0.05):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def teacher():
  model = UNet(**KW)
  # Perturb the freshly initialised weights so that conditional and null predictions differ.
  return model, _perturbed(init_params(model, key=jax.random.key(0), shape=SHAPE), jax.random.key(1))


def test_embedding_off_leaves_the_parameter_tree_unchanged():
  key = jax.random.key(3)
  plain = init_params(UNet(**KW), key=key, shape=SHAPE)
  off = init_params(UNet(**KW, guidance_embedding=False), key=key, shape=SHAPE)
  assert jax.tree.structure(plain) == jax.tree.structure(off)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(off)):
    np.testing.assert_array_equal(a, b)
  x, t, y = jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
  on = UNet(**KW, guidance_embedding=True).init({"params": key}, x, t, y, guidance=jnp.ones((1,)))["params"]
  assert set(on) - set(plain) == {"guidance_embedding"}
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves({k: v for k, v in on.items() if k in plain})):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="guidance must be given"):
    UNet(**KW).apply({"params": plain}, x, t, y, guidance=jnp.ones((1,)))


def test_guided_student_starts_as_the_conditional_teacher(teacher):
  model, params = teacher
  student = UNet(**KW, guidance_embedding=True)
  sp = init_guided_student(
    student_model=student, teacher_params=params, key=jax.random.key(4), image_shape=SHAPE
  )
  z = jax.random.normal(jax.random.key(5), (4, *SHAPE))
  t, y = jnp.array([0, 30, 60, 99]), jnp.array([1, 4, 7, 9])
  want = make_model_fn(model)(params, z, t, y)
  student_fn = make_guided_model_fn(student)
  for w in (0.0, 1.0, 3.7):
    got = student_fn(sp, z, t, {"label": y, "w": jnp.full((4,), w)})
    np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="guidance_embedding=True"):
    init_guided_student(student_model=model, teacher_params=params, key=jax.random.key(4), image_shape=SHAPE)


def test_stage_one_loss_regresses_the_cfg_combination(teacher):
  model, params = teacher
  student = UNet(**KW, guidance_embedding=True)
  sp = init_guided_student(
    student_model=student, teacher_params=params, key=jax.random.key(4), image_shape=SHAPE
  )
  x0 = jax.random.uniform(jax.random.key(6), (6, *SHAPE), minval=-1, maxval=1)
  y = jnp.arange(6)
  common = {
    "student_fn": make_guided_model_fn(student),
    "student_params": sp,
    "teacher_fn": make_model_fn(model),
    "teacher_params": params,
    "schedule": SCHEDULE,
    "x0": x0,
    "labels": y,
    "key": jax.random.key(7),
    "null_label": 10,
  }
  # At w = 1 the guided teacher is the conditional one, which the fresh student equals.
  loss1, _ = guided_distillation_loss(w=jnp.ones((6,)), **common)
  loss3, per3 = guided_distillation_loss(w=jnp.full((6,), 3.0), **common)
  assert float(loss1) < 1e-8 < float(loss3) and per3.shape == (6,)
  # The target is the CFG combination: it equals diffjax.guidance's guided model_fn.
  guided = classifier_free_guidance(make_model_fn(model), guidance_scale=3.0, null_cond=jnp.full_like(y, 10))
  z = jax.random.normal(jax.random.key(8), (6, *SHAPE))
  tt = jnp.full((6,), 50)
  c, u = make_model_fn(model)(params, z, tt, y), make_model_fn(model)(params, z, tt, jnp.full_like(y, 10))
  np.testing.assert_allclose(guided(params, z, tt, y), u + 3.0 * (c - u), atol=1e-5)


def test_student_generate_one_pass_per_step(teacher):
  model, params = teacher
  student = UNet(**KW, guidance_embedding=True)
  sp = init_guided_student(
    student_model=student, teacher_params=params, key=jax.random.key(4), image_shape=SHAPE
  )
  gen_s = make_student_generate(model=student, schedule=SCHEDULE, image_shape=SHAPE)
  gen_t = make_student_generate(model=model, schedule=SCHEDULE, image_shape=SHAPE)
  labels = np.arange(4)
  a = gen_s(sp, jax.random.key(0), labels, num_steps=3, guidance=2.5)
  b = gen_t(params, jax.random.key(0), labels, num_steps=3)
  assert a.shape == (4, *SHAPE)
  np.testing.assert_allclose(a, b, atol=1e-4)  # the fresh student ignores w
  with pytest.raises(ValueError, match="guidance must be 1"):
    gen_t(params, jax.random.key(0), labels, num_steps=3, guidance=2.0)
