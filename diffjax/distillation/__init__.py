"""Fast sampling by distillation: progressive (Salimans & Ho 2022) and guided (Meng et al. 2023).

Targets and losses are pure functions over ``model_fn(params, z_t, t, cond)`` (the teacher is just
another model_fn); :func:`run_distillation` runs the halvings as resumable stages of a work directory;
:func:`make_student_generate` samples with one forward pass per step.
"""

from diffjax.distillation.guided import (
  guided_cond_fn,
  guided_distillation_loss,
  init_guided_student,
  make_guided_model_fn,
  make_guided_step,
  sample_guidance,
)
from diffjax.distillation.progressive import (
  DISTILL_WEIGHTINGS,
  ddim_update,
  make_progressive_step,
  one_step_target,
  progressive_distillation_loss,
  step_triplets,
  student_grid,
  teacher_two_steps,
  x_space_loss,
  x_space_weight,
)
from diffjax.distillation.sampling import make_student_generate
from diffjax.distillation.stages import (
  GUIDED_STAGE,
  Stage,
  load_stage,
  run_distillation,
  stage_names,
  stage_plan,
)

__all__ = [
  "DISTILL_WEIGHTINGS",
  "GUIDED_STAGE",
  "Stage",
  "ddim_update",
  "guided_cond_fn",
  "guided_distillation_loss",
  "init_guided_student",
  "load_stage",
  "make_guided_model_fn",
  "make_guided_step",
  "make_progressive_step",
  "make_student_generate",
  "one_step_target",
  "progressive_distillation_loss",
  "run_distillation",
  "sample_guidance",
  "stage_names",
  "stage_plan",
  "step_triplets",
  "student_grid",
  "teacher_two_steps",
  "x_space_loss",
  "x_space_weight",
]
