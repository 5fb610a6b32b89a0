"""Spatially sparse incremental inference for edits (SIGE, Li et al. 2022).

Run the dense model once on the original and keep its feature maps and normalisation statistics; for an
edit, recompute only the blocks the edit touches. See :mod:`.plan` (masks to active tiles),
:mod:`.gather` (tile gather/scatter with halos), :mod:`.executors` (record / sparse / reference
execution), :mod:`.unet` (the U-Net's sparse twin) and :mod:`.sampling` (SDEdit and DDIM with a cache per
step).
"""

from diffjax.acceleration.sparse.plan import SparsePlan, bucket_size, difference_mask, level_masks, make_plan
from diffjax.acceleration.sparse.sampling import (
  SparseParams,
  SparseTrajectory,
  record_ddim,
  record_sdedit,
  sparse_model_fn,
)
from diffjax.acceleration.sparse.unet import (
  unet_forward,
  unet_macs,
  unet_masked_reference,
  unet_record,
  unet_sparse,
)

__all__ = [
  "SparseParams",
  "SparsePlan",
  "SparseTrajectory",
  "bucket_size",
  "difference_mask",
  "level_masks",
  "make_plan",
  "record_ddim",
  "record_sdedit",
  "sparse_model_fn",
  "unet_forward",
  "unet_macs",
  "unet_masked_reference",
  "unet_record",
  "unet_sparse",
]
