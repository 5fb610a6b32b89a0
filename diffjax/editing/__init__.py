"""Image editing with a trained denoiser: SDEdit (stroke- or image-guided) and its stroke-painting guides,
and prompt-to-prompt (cross-attention control of a text-to-image model)."""

from diffjax.editing.prompt_to_prompt import (
  EditSpec,
  local_blend_mask,
  prompt_to_prompt_control,
  prompt_to_prompt_sample,
)
from diffjax.editing.sdedit import SDEDIT_SAMPLERS, check_strength, sdedit, sdedit_num_steps
from diffjax.editing.strokes import stroke_paintings
from diffjax.editing.token_alignment import (
  TokenAlignment,
  align_prompts,
  refinement_alignment,
  replacement_alignment,
)

__all__ = [
  "SDEDIT_SAMPLERS",
  "EditSpec",
  "TokenAlignment",
  "align_prompts",
  "check_strength",
  "local_blend_mask",
  "prompt_to_prompt_control",
  "prompt_to_prompt_sample",
  "refinement_alignment",
  "replacement_alignment",
  "sdedit",
  "sdedit_num_steps",
  "stroke_paintings",
]
