"""Post-training calibration of fake-quantized diffusion models along full-precision sampling trajectories.

The calibration data are the inputs the full-precision model itself sees while sampling
(:func:`record_ddim_inputs`), from which :func:`calibrate` builds the ``"quant"`` collection of
:class:`~diffjax.quantization.fake_quant.QuantizedModel` with one of four methods:

* ``"single"`` (naive): all calibration inputs from one sampling step (by default the last, whose
  inputs are nearly clean images: what classic PTQ on real data would see);
* ``"random"`` (naive): each trajectory contributes the input of one uniformly random step;
* ``"time_aware"``: the same number of inputs, spread evenly over the whole trajectory (Q-Diffusion's
  time step-aware calibration, Li et al. 2023, Sec. 4.1);
* ``"per_timestep"``: one scale per sampling step and site, a table ``s[t]`` that the quantized model
  indexes by each example's timestep (activation ranges drift with t: Shang et al. 2023, "Post-training
  Quantization on Diffusion Models" (PTQ4DM); Li et al. 2023).

Weight scales do not depend on data: per output channel, searched on the weights themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.guidance import classifier_free_guidance
from diffjax.quantization.fake_quant import QuantizedModel
from diffjax.quantization.quantizers import activation_range, weight_scales
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.timesteps import make_timesteps

__all__ = ["CALIBRATION_METHODS", "CalibrationInputs", "calibrate", "record_ddim_inputs", "select_inputs"]

CALIBRATION_METHODS = ("single", "random", "time_aware", "per_timestep")


@dataclasses.dataclass
class CalibrationInputs:
  """Model inputs recorded along ``S`` sampling steps of ``N`` model-batch rows.

  Attributes:
    x: ``[S, N, ...]`` the model's input at each step (step 0 is the first, noisiest one).
    t: ``[S]`` int timesteps of the steps.
    cond: the model's condition, a pytree of ``[N, ...]`` arrays (the same at every step) or None.
  """

  x: np.ndarray
  t: np.ndarray
  cond: Any

  @property
  def num_steps(self) -> int:
    return int(self.x.shape[0])

  @property
  def num_rows(self) -> int:
    return int(self.x.shape[1])


def record_ddim_inputs(
  *,
  model_fn,
  params,
  schedule,
  x_T: jnp.ndarray,
  key: jax.Array,
  cond: Any = None,
  num_steps: int,
  eta: float = 0.0,
  spacing: str = "uniform",
  prediction: str = "eps",
  clip_x0: float | None = 1.0,
  guidance_scale: float | None = None,
  null_cond: Any = None,
) -> tuple[CalibrationInputs, jnp.ndarray]:
  """Samples with DDIM in full precision and records what the model sees at every step.

  The steps and per-step keys are those of :func:`diffjax.samplers.ddim_sample` (same ``x_T`` and
  ``key`` give the same samples).

  Args:
    model_fn: full-precision ``model_fn(params, x_t, t, cond)``.
    x_T: ``[B, H, W, C]`` initial noise.
    num_steps: number of DDIM steps (a Python int).
    guidance_scale, null_cond: classifier-free guidance (both given) as in
      :func:`diffjax.guidance.classifier_free_guidance`; the recorded rows are then the ``2B`` rows of
      the batched conditional and null passes.

  Returns:
    ``(inputs, samples)``: :class:`CalibrationInputs` with ``N = B`` (or ``2B`` with guidance) and the
    ``[B, H, W, C]`` samples.
  """
  if (guidance_scale is None) != (null_cond is None):
    raise ValueError("guidance_scale and null_cond must be given together")
  num_steps = int(num_steps)
  ts = make_timesteps(num_timesteps=schedule.num_timesteps, num_steps=num_steps, spacing=spacing)[:num_steps]
  order = np.arange(num_steps - 1, -1, -1)
  t_cur = ts[order]
  t_prev = jnp.where(order > 0, ts[np.maximum(order - 1, 0)], -1)

  @jax.jit
  def run(params, x_T, key, cond):
    seen: list = []

    def recording(p, x, t, c):
      seen.append((x, c))
      return model_fn(p, x, t, c)

    fn = recording
    if guidance_scale is not None:
      fn = classifier_free_guidance(recording, guidance_scale=guidance_scale, null_cond=null_cond)

    def body(x, inp):
      j, t, tp = inp
      seen.clear()
      x_prev = ddim_step(
        model_fn=fn,
        params=params,
        schedule=schedule,
        x_t=x,
        t=t,
        t_prev=tp,
        cond=cond,
        key=jax.random.fold_in(key, j),
        eta=eta,
        prediction=prediction,
        clip_x0=clip_x0,
      )
      return x_prev, seen[0]

    return jax.lax.scan(body, x_T, (jnp.arange(num_steps), t_cur, t_prev))

  samples, (xs, conds) = run(params, x_T, key, cond)
  cond_rows = jax.tree.map(lambda c: np.asarray(c[0]), conds)
  return CalibrationInputs(x=np.asarray(xs), t=np.asarray(t_cur), cond=cond_rows), samples


def select_inputs(
  inputs: CalibrationInputs, *, method: str, num: int | None = None, step: int = -1, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray, Any]]:
  """The calibration examples of a method as ``[(x [n, ...], t [n], cond)]`` groups.

  Args:
    inputs: recorded model inputs.
    method: one of :data:`CALIBRATION_METHODS`.
    num: examples for the static methods (default: ``N``, one per recorded row).
    step: the step index used by ``"single"`` (``-1``: the last, least noisy step).
    seed: randomness of ``"random"`` and of the row choice.

  Returns:
    One group for a static method; one group per step (in step order) for ``"per_timestep"``.
  """
  if method not in CALIBRATION_METHODS:
    raise ValueError(f"method={method!r} is not one of {CALIBRATION_METHODS}")
  S, N = inputs.num_steps, inputs.num_rows
  if not -S <= step < S:
    raise ValueError(f"step={step} is outside the {S} recorded steps")
  num = N if num is None else int(num)
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  rng = np.random.default_rng(seed)
  take_cond = lambda rows: jax.tree.map(lambda c: c[rows], inputs.cond)
  if method == "per_timestep":
    return [(inputs.x[s], np.full(N, inputs.t[s]), inputs.cond) for s in range(S)]
  rows = rng.choice(N, size=num, replace=num > N)
  if method == "single":
    steps = np.full(num, step % S)
  elif method == "random":
    steps = rng.integers(0, S, num)
  else:  # time_aware: steps evenly spread over the trajectory, rows assigned round-robin
    grid = np.round(np.linspace(0, S - 1, min(S, num))).astype(int)
    steps = grid[np.arange(num) % len(grid)]
  return [(inputs.x[steps, rows], inputs.t[steps], take_cond(rows))]


def _merge(stats: list[dict]) -> dict:
  """Pools per-batch site statistics: min of mins, max of maxes, all value samples."""
  out = {}
  for key in stats[0]:
    vals = [s[key] for s in stats]
    if key[-1].endswith("_min"):
      out[key] = np.min(vals)
    elif key[-1].endswith("_max"):
      out[key] = np.max(vals)
    elif key[-1].endswith("_values") or key[-1].endswith("_weights"):
      out[key] = np.concatenate([np.asarray(v).reshape(-1) for v in vals])
    else:
      out[key] = np.asarray(vals[0])
  return out


def _observe_groups(qmodel: QuantizedModel, params, groups, batch_size: int) -> list[dict]:
  observe = lambda p, x, t, c: qmodel.observe(p, x, t, c)[1]
  merged = []
  for x, t, cond in groups:
    batches = []
    n = x.shape[0]
    for sl in np.array_split(np.arange(n), -(-n // batch_size)):  # equal batches: one or two shapes
      c = jax.tree.map(lambda a, sl=sl: a[sl], cond)
      stats = observe(params, jnp.asarray(x[sl]), jnp.asarray(t[sl]), c)
      batches.append(jax.tree.map(np.asarray, traverse_util.flatten_dict(stats)))
    merged.append(_merge(batches))
  return merged


def _site_kind(site: str, layer_kind: str | None) -> tuple[str, str | None]:
  """(bits kind, forced mode) of an activation site."""
  if site in ("q", "k"):
    return "qk", None
  if site == "v":
    return "v", None
  if site == "p":
    return "softmax", "unsigned"
  return layer_kind, None


def calibrate(
  qmodel: QuantizedModel,
  params,
  inputs: CalibrationInputs,
  *,
  method: str,
  num: int | None = None,
  step: int = -1,
  seed: int = 0,
  batch_size: int = 256,
) -> dict:
  """Builds the ``"quant"`` collection of ``qmodel`` from recorded full-precision inputs.

  Args:
    qmodel: the fake-quantized model (its config sets bits, splitting and range search).
    params: full-precision parameters.
    inputs: from :func:`record_ddim_inputs` (or any :class:`CalibrationInputs`).
    method: "single", "random", "time_aware" or "per_timestep" (module docstring).
    num, step, seed: see :func:`select_inputs`.
    batch_size: rows per observation pass.

  Returns:
    The ``"quant"`` tree: weight scales, activation scales/zero points ``[K]`` and ``timesteps [K]``
    (``K = 1`` except for "per_timestep", where ``K = S``).
  """
  groups = select_inputs(inputs, method=method, num=num, step=step, seed=seed)
  stats = _observe_groups(qmodel, params, groups, batch_size)
  cfg = qmodel.config
  base = stats[0]
  layers = {k[:-1]: int(v) for k, v in base.items() if k[-1] == "layer"}
  splits = {k[:-1]: int(v) for k, v in base.items() if k[-1] == "split"}
  flat_p = traverse_util.flatten_dict(params)
  out: dict[tuple, Any] = {}

  for path, ndim in layers.items():
    kind = "conv" if ndim == 4 else "dense"
    bits = cfg.weight_bits(path, kind)
    if bits is None:
      continue
    kernel = np.asarray(flat_p[path + ("kernel",)])
    if path in splits:
      s = splits[path]
      out[path + ("w_scale",)] = jnp.asarray(
        np.stack(
          [
            weight_scales(kernel[..., :s, :], bits, search=cfg.weight_search),
            weight_scales(kernel[..., s:, :], bits, search=cfg.weight_search),
          ]
        )
      )
      out[path + ("w_split",)] = jnp.int32(s)
    else:
      out[path + ("w_scale",)] = jnp.asarray(weight_scales(kernel, bits, search=cfg.weight_search)[None])

  act_mode = "symmetric" if cfg.act_symmetric else "asymmetric"
  for key in base:
    if not key[-1].endswith("_values"):
      continue
    path, site = key[:-1], key[-1][: -len("_values")]
    layer_kind = {4: "conv", 2: "dense"}.get(layers.get(path))
    kind, forced = _site_kind(site, layer_kind)
    gather = lambda name, p=path, si=site: np.stack([s[p + (f"{si}_{name}",)] for s in stats])
    scale, zero = activation_range(
      gather("values"),
      weights=gather("weights"),
      lo=gather("min"),
      hi=gather("max"),
      bits=cfg.act_bits(path, kind),
      mode=forced or act_mode,
      search=cfg.act_search,
    )
    out[path + (f"{site}_scale",)] = jnp.asarray(scale)
    out[path + (f"{site}_zero",)] = jnp.asarray(zero)

  if method == "per_timestep":
    out[("timesteps",)] = jnp.asarray(inputs.t, jnp.int32)
  else:
    out[("timesteps",)] = jnp.zeros((1,), jnp.int32)
  return traverse_util.unflatten_dict(out)
