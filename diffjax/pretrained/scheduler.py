"""A diffusers scheduler config (``scheduler/scheduler_config.json``) mapped to diffjax's schedule and DDIM.

Stable-Diffusion pipelines ship the noise schedule they were trained with as a scheduler config
(``PNDMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``, ... all share the same keys). diffjax
reads the schedule and the timestep conventions from it and samples with DDIM (Song et al. 2021), as
``DDIMScheduler.from_config(pipe.scheduler.config)`` does in diffusers, reproducing its
``set_timesteps`` and ``step`` exactly:

* ``beta_schedule``: ``linear`` (``linspace(beta_start, beta_end)``), ``scaled_linear`` (linear in
  ``sqrt(beta)``, Stable Diffusion), ``squaredcos_cap_v2`` (the cosine schedule of Nichol & Dhariwal 2021)
  or explicit ``trained_betas``; float32 tables built as torch builds them (``torch.linspace``'s
  two-sided formula, sequential float32 ``cumprod``), so the alpha-bars are bit-identical;
* ``timestep_spacing``: ``leading`` (``i * (T // n) + steps_offset``), ``trailing``
  (``round(T - k T / n) - 1``, Lin et al. 2024) or ``linspace`` (``round(linspace(0, T - 1, n))``);
* each step moves ``t`` to ``t - T // n`` (diffusers' rule, whatever the spacing); below 0 it lands on
  ``alphas_cumprod[0]`` when ``set_alpha_to_one`` is false (SD 1.x/2.x), else on 1;
* ``prediction_type``: ``epsilon`` / ``v_prediction`` (Salimans & Ho 2022) / ``sample``;
* ``clip_sample`` with ``clip_sample_range``: the x0 estimate is clipped, the model's eps is kept.

Unset keys take ``DDIMScheduler``'s defaults. Options this port does not implement (``thresholding``,
``rescale_betas_zero_snr``, another spacing or beta schedule) are refused with their name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffjax.samplers.timesteps import TimestepTable
from diffjax.schedules import Schedule, schedule_from_betas

__all__ = ["DDIM_DEFAULTS", "SchedulerConfig", "diffusers_betas", "scheduler_from_config"]

# diffusers DDIMScheduler.__init__ defaults.
DDIM_DEFAULTS = {
  "num_train_timesteps": 1000,
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "trained_betas": None,
  "clip_sample": True,
  "set_alpha_to_one": True,
  "steps_offset": 0,
  "prediction_type": "epsilon",
  "thresholding": False,
  "clip_sample_range": 1.0,
  "timestep_spacing": "leading",
  "rescale_betas_zero_snr": False,
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = ("leading", "trailing", "linspace")
_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` on CPU, bit for bit.

  float32 endpoints and step; the first half counts up from ``start``, the second down from ``end``,
  each entry one fused multiply-add (exact in float64 here, then rounded once).
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  idx = np.arange(steps, dtype=np.float64)
  half = steps // 2
  low = np.float64(start32) + step * idx[:half]
  high = np.float64(end32) - step * (steps - 1 - idx[half:])
  return np.concatenate([low, high]).astype(np.float32)


def diffusers_betas(config: Mapping[str, Any]) -> np.ndarray:
  """The float32 betas ``[T]`` a diffusers scheduler builds from ``config`` (defaults as ``DDIMScheduler``).

  Raises:
      ValueError: On an unsupported ``beta_schedule``.
  """
  cfg = {**DDIM_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k == "trained_betas"}}
  T = int(cfg["num_train_timesteps"])
  if cfg["trained_betas"] is not None:
    betas = np.asarray(cfg["trained_betas"], np.float32)
    if betas.shape != (T,):
      raise ValueError(f"trained_betas has shape {betas.shape}, expected ({T},) = num_train_timesteps")
    return betas
  kind = cfg["beta_schedule"]
  if kind == "linear":
    return _torch_linspace(cfg["beta_start"], cfg["beta_end"], T)
  if kind == "scaled_linear":
    return np.square(_torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T))
  if kind == "squaredcos_cap_v2":

    def alpha_bar(t: float) -> float:
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], np.float32)
  raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported (supported: {_BETAS})")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """A scheduler config in diffjax terms.

  Attributes:
      schedule: The noise schedule (alpha-bars equal to diffusers' float32 ``alphas_cumprod``).
      spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
      steps_offset: Added to ``leading`` timesteps (1 in Stable Diffusion).
      final_alpha_bar: Alpha-bar after the last step (``alphas_cumprod[0]`` or 1).
      prediction: What the model predicts: ``"eps"``, ``"v"`` or ``"x0"``.
      clip_x0: Clip range of the x0 estimate, or ``None``.
      config: The scheduler config as read (diffusers' keys).
  """

  schedule: Schedule
  spacing: str
  steps_offset: int
  final_alpha_bar: float
  prediction: str
  clip_x0: float | None
  config: Mapping[str, Any]

  @property
  def num_train_timesteps(self) -> int:
    return self.schedule.num_timesteps

  def timesteps(self, num_steps: int) -> np.ndarray:
    """diffusers' ``DDIMScheduler.set_timesteps(num_steps)`` timesteps, decreasing, int64 ``[num_steps]``.

    Raises:
        ValueError: If ``num_steps`` is not in ``[1, T]`` or a timestep falls outside ``[0, T)``.
    """
    T = self.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or not 1 <= num_steps <= T:
      raise ValueError(f"num_steps must be an int in [1, {T}] (num_train_timesteps), got {num_steps!r}")
    n = int(num_steps)
    if self.spacing == "linspace":
      ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif self.spacing == "leading":
      ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + self.steps_offset
    else:
      ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if ts.min() < 0 or ts.max() >= T:
      raise ValueError(
        f"{n} steps with timestep_spacing={self.spacing!r} and steps_offset={self.steps_offset} give timesteps "
        f"outside [0, {T}): {ts.tolist()}"
      )
    return ts

  def table(self, num_steps: int) -> TimestepTable:
    """The DDIM plan of ``num_steps`` steps, padded to ``[T]`` so that any step count has one shape.

    Returns:
        A :class:`~diffjax.samplers.timesteps.TimestepTable` for
        :func:`~diffjax.samplers.ddim.ddim_sample` and :func:`~diffjax.editing.sdedit.sdedit`.
    """
    ts = self.timesteps(num_steps)[::-1]
    prev = ts - self.num_train_timesteps // int(num_steps)
    prev = np.where(prev >= 0, prev, -1)
    pad = self.num_train_timesteps - ts.shape[0]
    return TimestepTable(
      timesteps=jnp.asarray(np.pad(ts, (0, pad), mode="edge"), jnp.int32),
      prev_timesteps=jnp.asarray(np.pad(prev, (0, pad), mode="edge"), jnp.int32),
      final_alpha_bar=jnp.asarray(self.final_alpha_bar, jnp.float32),
    )


def scheduler_from_config(config: Mapping[str, Any]) -> SchedulerConfig:
  """Maps a diffusers scheduler config to a :class:`SchedulerConfig`.

  Args:
      config: The parsed ``scheduler_config.json`` (any scheduler class; its schedule keys are read).

  Returns:
      The schedule and DDIM conventions.

  Raises:
      ValueError: Listing every unsupported value (named by key, with the supported ones).
  """
  cfg = {**DDIM_DEFAULTS, **{k: v for k, v in config.items() if v is not None or k == "trained_betas"}}
  problems = []
  if cfg["beta_schedule"] not in _BETAS and cfg["trained_betas"] is None:
    problems.append(f"beta_schedule={cfg['beta_schedule']!r} (supported: {_BETAS})")
  if cfg["timestep_spacing"] not in _SPACINGS:
    problems.append(f"timestep_spacing={cfg['timestep_spacing']!r} (supported: {_SPACINGS})")
  if cfg["prediction_type"] not in _PREDICTIONS:
    problems.append(f"prediction_type={cfg['prediction_type']!r} (supported: {tuple(_PREDICTIONS)})")
  for key in ("thresholding", "rescale_betas_zero_snr"):
    if cfg[key]:
      problems.append(f"{key}={cfg[key]!r} (supported: False)")
  T = cfg["num_train_timesteps"]
  if isinstance(T, bool) or not isinstance(T, int) or T < 2:
    problems.append(f"num_train_timesteps={T!r} (must be an int >= 2)")
  if (
    isinstance(cfg["steps_offset"], bool)
    or not isinstance(cfg["steps_offset"], int)
    or cfg["steps_offset"] < 0
  ):
    problems.append(f"steps_offset={cfg['steps_offset']!r} (must be an int >= 0)")
  if problems:
    raise ValueError("unsupported scheduler config:\n" + "\n".join(problems))
  betas = diffusers_betas(cfg)
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(
      "scheduler config: betas must lie in (0, 1); check beta_start / beta_end / trained_betas"
    )
  # As torch: alphas = 1 - betas in float32, cumprod accumulated in float64 and stored as float32.
  alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
  schedule = schedule_from_betas(betas.astype(np.float64))
  ac = jnp.asarray(alphas_cumprod)
  schedule = schedule.replace(
    alphas_cumprod=ac,
    alphas_cumprod_prev=jnp.concatenate([jnp.ones((1,), jnp.float32), ac[:-1]]),
    snr=ac / (1.0 - ac),
  )
  return SchedulerConfig(
    schedule=schedule,
    spacing=cfg["timestep_spacing"],
    steps_offset=int(cfg["steps_offset"]),
    final_alpha_bar=1.0 if cfg["set_alpha_to_one"] else float(alphas_cumprod[0]),
    prediction=_PREDICTIONS[cfg["prediction_type"]],
    clip_x0=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    config=dict(config),
  )
