"""Device meshes and data-parallel placement through ``jax.sharding``.

The mesh has one named axis, ``data``; the train state is replicated and each batch is sharded along
its leading axis. One code path serves 1 device, many local devices, and many hosts (after
``jax.distributed.initialize``): each host loads only its slice of the global batch and
``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(
  *,
  enabled: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Calls ``jax.distributed.initialize`` for multi-host runs (no-op unless ``enabled``).

  On TPU pods and SLURM/GPU clusters the arguments may be left None: JAX discovers them.
  """
  if not enabled:
    return
  kwargs = {
    k: v
    for k, v in dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    ).items()
    if v is not None
  }
  jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over the first ``num_devices`` devices (default: all of them)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n:
    raise ValueError(f"batch_size={global_batch_size} must be divisible by the number of devices ({n})")


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's slice of a batch into global arrays sharded along ``data``."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
