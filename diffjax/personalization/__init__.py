"""Personalization of text-to-image models: DreamBooth (Ruiz et al. 2023) and FastComposer (Xiao et al. 2023).

* :mod:`~diffjax.personalization.subjects`: digit subjects, their augmented shots, scenes and prompts.
* :mod:`~diffjax.personalization.dreambooth`: the prior-preservation loss and the fine-tuning step.
* :mod:`~diffjax.personalization.fastcomposer`: subject fusion, the localization loss, delayed
  conditioning; :mod:`~diffjax.personalization.fastcomposer_step` its training step and
  :mod:`~diffjax.personalization.sampling` its sampler.

Training loops: :mod:`diffjax.training.dreambooth_loop`, :mod:`diffjax.training.fastcomposer_loop`
(``python -m diffjax.training.personalize_main``).
"""

from diffjax.personalization.dreambooth import make_dreambooth_train_step, prior_preservation_loss
from diffjax.personalization.fastcomposer import (
  balanced_l1,
  delay_switch_timestep,
  delayed_context,
  fuse_subjects,
  localization_loss,
  resize_masks,
)
from diffjax.personalization.subjects import (
  DEFAULT_IDENTIFIER,
  augment_digits,
  compose_scenes,
  digit_word_positions,
  distinctive_digit,
  left_named_first,
  subject_caption,
  subject_fields,
)

__all__ = [
  "DEFAULT_IDENTIFIER",
  "augment_digits",
  "balanced_l1",
  "compose_scenes",
  "delay_switch_timestep",
  "delayed_context",
  "digit_word_positions",
  "distinctive_digit",
  "fuse_subjects",
  "left_named_first",
  "localization_loss",
  "make_dreambooth_train_step",
  "prior_preservation_loss",
  "resize_masks",
  "subject_caption",
  "subject_fields",
]
