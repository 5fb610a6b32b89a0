"""Discrete noise schedules as dataclasses of arrays.

A schedule holds every per-timestep table the diffusion math needs, so the rest of the library reads
``schedule.alphas_cumprod[t]`` instead of recomputing products. All tables are float32 arrays of
length ``T`` indexed by the integer timestep ``t in [0, T)``, where ``t = 0`` is the least noisy step
(the paper's ``t = 1``).

References:
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (linear schedule, Eq. 4-7).
  Nichol & Dhariwal 2021, "Improved DDPM" (cosine schedule, Eq. 17).
  Rombach et al. 2022, "Latent Diffusion" (scaled-linear schedule used by Stable Diffusion).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear")


@struct.dataclass
class Schedule:
  """Per-timestep tables of a discrete diffusion process, each float32 ``[T]``.

  Attributes:
    betas: beta_t, the variance added at step t.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha-bar_{t-1}, with alpha-bar_{-1} = 1.
    posterior_variance: beta-tilde_t = (1 - ab_{t-1}) / (1 - ab_t) * beta_t.
    posterior_log_variance_clipped: log beta-tilde_t with the t=0 entry replaced by t=1's (finite).
    posterior_mean_coef_x0: coefficient of x_0 in the mean of q(x_{t-1} | x_t, x_0).
    posterior_mean_coef_xt: coefficient of x_t in that mean.
    snr: alpha-bar_t / (1 - alpha-bar_t).
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef_x0: jnp.ndarray
  posterior_mean_coef_xt: jnp.ndarray
  snr: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def _linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
  # Ho et al. use 1e-4 .. 0.02 for T = 1000; rescale so other T keep the same total noise.
  scale = 1000.0 / T
  return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  steps = np.arange(T + 1, dtype=np.float64) / T
  f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
  return np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)


def make_schedule(
  kind: str = "linear",
  *,
  num_timesteps: int = 1000,
  beta_start: float | None = None,
  beta_end: float | None = None,
) -> Schedule:
  """Builds a schedule's tables in float64 numpy, then stores them as float32.

  Args:
    kind: "linear" (DDPM; betas 1e-4..0.02 rescaled by 1000/T), "cosine" (improved DDPM) or
      "scaled_linear" (Stable Diffusion; linear in sqrt(beta), defaults 0.00085..0.012).
    num_timesteps: T, the number of discrete steps (>= 2).
    beta_start: first beta; defaults depend on ``kind``; ignored for "cosine".
    beta_end: last beta; as above.

  Returns:
    A :class:`Schedule` whose tables are float32 ``[T]``.
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"kind={kind!r} is not one of {SCHEDULE_KINDS}")
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
  T = int(num_timesteps)
  if kind == "linear":
    betas = _linear_betas(T, beta_start or 1e-4, beta_end or 0.02)
  elif kind == "scaled_linear":
    betas = _scaled_linear_betas(T, beta_start or 0.00085, beta_end or 0.012)
  else:
    betas = _cosine_betas(T)
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(f"betas of the {kind!r} schedule must lie in (0, 1); check beta_start/beta_end")
  return schedule_from_betas(betas)


def schedule_from_betas(betas) -> Schedule:
  """Builds all tables from an explicit ``betas`` array ``[T]`` (float64 math, float32 storage)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}")
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  coef_x0 = betas * np.sqrt(ab_prev) / (1.0 - ab)
  coef_xt = (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
    betas=f32(betas),
    alphas=f32(alphas),
    alphas_cumprod=f32(ab),
    alphas_cumprod_prev=f32(ab_prev),
    posterior_variance=f32(post_var),
    posterior_log_variance_clipped=f32(post_logvar),
    posterior_mean_coef_x0=f32(coef_x0),
    posterior_mean_coef_xt=f32(coef_xt),
    snr=f32(ab / (1.0 - ab)),
  )
