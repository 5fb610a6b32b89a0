"""Image editing with a trained denoiser: SDEdit (stroke- or image-guided) and its stroke-painting guides."""

from diffjax.editing.sdedit import SDEDIT_SAMPLERS, check_strength, sdedit, sdedit_num_steps
from diffjax.editing.strokes import stroke_paintings

__all__ = ["SDEDIT_SAMPLERS", "check_strength", "sdedit", "sdedit_num_steps", "stroke_paintings"]
