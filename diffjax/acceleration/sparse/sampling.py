"""SDEdit and DDIM with spatially sparse incremental inference: a cache per step (SIGE).

Li et al. 2022, "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models", Sec. 4:
for a diffusion model, the original image's trajectory is run once densely and every step's features are
kept; an edit then re-runs the same sampler (same key, so the same noise) with each step's model call
evaluated sparsely against the cache of that step. Outside the edit the edited trajectory therefore
stays equal to the original's, and each step recomputes only the edited blocks.

* :func:`record_sdedit` / :func:`record_ddim` run :func:`diffjax.editing.sdedit` /
  :func:`diffjax.samplers.ddim_sample` densely on the original and return its result together with a
  :class:`SparseTrajectory` (the cache of every step, keyed by timestep).
* :func:`sparse_model_fn` is a house-style ``model_fn(params, x_t, t, cond)`` whose ``params`` is a
  :class:`SparseParams` (model parameters, trajectory, plan); it looks up the cache of step ``t`` and runs
  :func:`~diffjax.acceleration.sparse.unet.unet_sparse`. It plugs into the unchanged ``sdedit`` and
  ``ddim_sample``; a timestep without a cache gives NaN.

Example::

    x_orig, traj = record_sdedit(unet=unet, params=p, schedule=s, x_guide=guide, key=key, strength=0.6)
    plan = make_plan(difference_mask(edited_guide, guide), block_sizes=(8, 4, 2, None))
    x_edit = sdedit(model_fn=sparse_model_fn(unet), params=SparseParams(p, traj, plan), schedule=s,
                    x_guide=edited_guide, key=key, strength=0.6)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffjax.acceleration.sparse.plan import SparsePlan
from diffjax.acceleration.sparse.unet import unet_masked_reference, unet_record, unet_sparse
from diffjax.editing.sdedit import sdedit_full_steps, sdedit_num_steps, sdedit_setup, sdedit_step
from diffjax.models.unet import UNet
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.loop import reverse_loop
from diffjax.samplers.timesteps import TimestepTable, make_timesteps
from diffjax.schedules import Schedule

__all__ = ["SparseParams", "SparseTrajectory", "record_ddim", "record_sdedit", "sparse_model_fn"]


@struct.dataclass
class SparseTrajectory:
  """The caches of a dense sampler run, one slot per step.

  Attributes:
      caches: name -> ``[S, ...]``: slot ``j`` holds the cache of :func:`unet_record` at the ``j``-th
          model call (from the noisiest step down).
      timesteps: int32 ``[S]``, the timestep of every slot; ``-1`` for unused slots.
  """

  caches: dict
  timesteps: jnp.ndarray


@struct.dataclass
class SparseParams:
  """The ``params`` of :func:`sparse_model_fn`: model parameters, the original's trajectory, the edit's plan."""

  params: Any
  trajectory: SparseTrajectory
  plan: SparsePlan


def sparse_model_fn(unet: UNet, *, reference: bool = False):
  """``model_fn(SparseParams, x_t, t, cond)``: the sparse U-Net against the cache of timestep ``t``.

  Args:
      unet: the :class:`~diffjax.models.UNet` module whose parameters are in ``SparseParams.params``.
      reference: evaluate the same function densely (:func:`unet_masked_reference`), for tests.

  Returns:
      A model function for any sampler in the house interface. ``t`` must be one timestep for the whole
      batch (as every sampler calls it); where no slot of the trajectory has that timestep the output is NaN.
  """

  def model_fn(bundle: SparseParams, x_t, t, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
    hit = bundle.trajectory.timesteps == t[0]
    apply = unet_masked_reference if reference else unet_sparse
    out = apply(unet, bundle.params, x_t, t, cond, cache=bundle.trajectory.caches, plan=bundle.plan,
                slot=jnp.argmax(hit))
    return jnp.where(jnp.any(hit), out, jnp.nan)

  return model_fn


def _concrete_steps(num_slots, fn, what: str) -> int:
  if num_slots is not None:
    if int(num_slots) < 1:
      raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    return int(num_slots)
  with jax.ensure_compile_time_eval():  # concrete inputs give a concrete count even under jit
    n = fn()
  if isinstance(n, jax.core.Tracer):
    raise ValueError(f"num_slots must be given when {what} is traced")
  return int(np.asarray(n))


def _record_loop(*, unet, params, x_T, timesteps, num_steps, key, cond, num_slots, step, prev_timesteps=None):
  """``reverse_loop`` with the dense recording model; ``step(model_fn, x, t, t_prev, key) -> x_prev``."""
  B = x_T.shape[0]
  tb = jax.ShapeDtypeStruct((B,), jnp.int32)
  _, shapes = jax.eval_shape(lambda p, x, t: unet_record(unet, p, x, t, cond), params, x_T, tb)
  caches = jax.tree.map(lambda s: jnp.zeros((num_slots, *s.shape), s.dtype), shapes)
  slots = jnp.full((num_slots,), -1, jnp.int32)

  def body(state, t, t_prev, k):
    x, caches, slots, j = state
    pred, cache = unet_record(unet, params, x, jnp.full((B,), t, jnp.int32), cond)
    x_prev = step(lambda *_: pred, x, t, t_prev, k)
    caches = jax.tree.map(lambda buf, c: buf.at[j].set(c, mode="drop"), caches, cache)
    return x_prev, caches, slots.at[j].set(t, mode="drop"), j + 1

  init = (x_T, caches, slots, jnp.zeros((), jnp.int32))
  x0, caches, slots, _ = reverse_loop(step_fn=body, x_T=init, timesteps=timesteps, num_steps=num_steps, key=key,
                                      prev_timesteps=prev_timesteps)
  return x0, SparseTrajectory(caches=caches, timesteps=slots)


def record_sdedit(
  *,
  unet: UNet,
  params,
  schedule: Schedule,
  x_guide: jnp.ndarray,
  key: jax.Array,
  strength,
  cond: Any = None,
  mask: jnp.ndarray | None = None,
  sampler: str = "ddim",
  num_steps=50,
  eta=0.0,
  spacing: str = "trailing",
  variance: str = "small",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  table: TimestepTable | None = None,
  eps_from_clipped_x0: bool = True,
  num_slots: int | None = None,
) -> tuple[jnp.ndarray, SparseTrajectory]:
  """:func:`diffjax.editing.sdedit` of the original guide with the dense U-Net, recording every step.

  Args:
      unet: the U-Net module; ``params`` its parameters.
      schedule, x_guide, key, strength, cond, mask, sampler, num_steps, eta, spacing, variance,
          prediction, clip_x0, table, eps_from_clipped_x0: as for :func:`~diffjax.editing.sdedit` (the edit must later use the same
          values, the key in particular).
      num_slots: static number of cache slots (at least the steps run,
          ``ceil(strength * num_steps)``); computed when ``strength`` and ``num_steps`` are concrete.

  Returns:
      ``(x, trajectory)``: the dense SDEdit result (equal to ``sdedit`` with the dense model) and the
      caches of its steps.

  Raises:
      ValueError: as ``sdedit``, or when ``num_slots`` is missing for a traced strength or step count.
  """
  x_t0, ts, k, mask, prev_ts, final_ab = sdedit_setup(
    schedule=schedule, x_guide=x_guide, key=key, strength=strength, mask=mask, sampler=sampler,
    num_steps=num_steps, spacing=spacing, table=table)
  n_full = sdedit_full_steps(sampler=sampler, num_steps=num_steps, num_timesteps=schedule.num_timesteps)
  slots = _concrete_steps(num_slots, lambda: sdedit_num_steps(strength=strength, num_steps=n_full),
                          "strength or num_steps")

  def step(model_fn, x, t, t_prev, k_step):
    return sdedit_step(model_fn=model_fn, params=None, schedule=schedule, x_guide=x_guide, mask=mask, x=x, t=t,
                       t_prev=t_prev, key=k_step, cond=cond, sampler=sampler, eta=eta, variance=variance,
                       prediction=prediction, clip_x0=clip_x0,
                       final_alpha_bar=final_ab, eps_from_clipped_x0=eps_from_clipped_x0)

  return _record_loop(unet=unet, params=params, x_T=x_t0, timesteps=ts, num_steps=k, key=jax.random.fold_in(key, 1),
                      cond=cond, num_slots=slots, step=step, prev_timesteps=prev_ts)


def record_ddim(
  *,
  unet: UNet,
  params,
  schedule: Schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: Any = None,
  num_steps=50,
  eta=0.0,
  spacing: str = "uniform",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  num_slots: int | None = None,
) -> tuple[jnp.ndarray, SparseTrajectory]:
  """:func:`diffjax.samplers.ddim_sample` from ``x_T`` with the dense U-Net, recording every step.

  An edit then runs ``ddim_sample`` with :func:`sparse_model_fn` from an ``x_T`` changed in a region
  (e.g. fresh noise there to regenerate it) with the same ``key`` and settings.

  Args:
      unet, params: the U-Net module and its parameters.
      schedule, x_T, key, cond, num_steps, eta, spacing, prediction, clip_x0: as for ``ddim_sample``.
      num_slots: static number of cache slots (>= ``num_steps``); defaults to a concrete ``num_steps``.

  Returns:
      ``(x0, trajectory)``: the dense sample and the caches of its steps.
  """
  ts = make_timesteps(num_timesteps=schedule.num_timesteps, num_steps=num_steps, spacing=spacing)
  slots = _concrete_steps(num_slots, lambda: num_steps, "num_steps")

  def step(model_fn, x, t, t_prev, k_step):
    return ddim_step(model_fn=model_fn, params=None, schedule=schedule, x_t=x, t=t, t_prev=t_prev, cond=cond,
                     key=k_step, eta=eta, prediction=prediction, clip_x0=clip_x0)

  return _record_loop(unet=unet, params=params, x_T=x_T, timesteps=ts, num_steps=num_steps, key=key, cond=cond,
                      num_slots=slots, step=step)
