"""AdaRound-style learned weight rounding, reconstructed block by block.

Rounding every weight to its nearest grid point is not what minimises a layer's output error. AdaRound
(Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization") learns, per weight,
whether to round down or up: ``W~ = s * clip(floor(W / s) + h(V), -q_max, q_max)`` with the rectified
sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, minimising the reconstruction error
plus ``lambda * sum(1 - |2 h(V) - 1|^beta)``, a regulariser that pushes ``h`` to 0 or 1 as ``beta``
anneals from 20 to 2. BRECQ (Li et al. 2021) reconstructs whole blocks rather than single layers, and
Q-Diffusion (Li et al. 2023) does so for diffusion U-Nets on time-aware calibration data.

Here a block is each direct child module of the model (for the U-Net: ``down_blocks_i``, ``mid_block``,
``up_blocks_i``, and the stem/head layers on their own). Each block's full-precision inputs and
outputs are captured on calibration examples spread over the sampling trajectory; its kernels' rounding
is then learned with the block's activations fake-quantized exactly as in the model (per-timestep
tables, split shortcuts). The result is a parameter tree of the same structure whose quantized kernels
lie on their grids, so :func:`~diffjax.quantization.fake_quant_params` leaves them unchanged and
:mod:`~diffjax.quantization.export` stores their integers.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from diffjax.quantization.calibration import CalibrationInputs, select_inputs
from diffjax.quantization.fake_quant import QUANT, QuantizedModel, _Interceptor
from diffjax.quantization.quantizers import int_range

__all__ = ["GAMMA", "ZETA", "adaround", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jnp.ndarray) -> jnp.ndarray:
  """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (AdaRound Eq. 23)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(frac: jnp.ndarray) -> jnp.ndarray:
  """V with ``h(V) = frac`` (so that learning starts from the exact weights)."""
  p = jnp.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
  return jnp.log(p / (1 - p))


class _Capture:
  """Records the inputs and outputs of every call of a direct child of the root module."""

  def __init__(self):
    self.calls: dict[str, dict] = {}

  def __call__(self, next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    if (
      context.method_name == "__call__"
      and m.scope is not None
      and len(m.path) == 1
      and m.path[0] not in self.calls
    ):
      leaves, treedef = jax.tree.flatten((args, kwargs))
      arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
      self.calls[m.path[0]] = {
        "module": m.clone(parent=None),
        "treedef": treedef,
        "leaves": leaves,
        "arrays": arrays,
        "inputs": [leaves[i] for i in arrays],
        "output": out,
      }
    return out


def _capture(model: nn.Module, params, x, t, cond) -> dict[str, dict]:
  """Runs the full-precision model once and returns each block's captured call (concrete arrays)."""
  cap = _Capture()

  @jax.jit
  def run(params, x, t, cond):
    with nn.intercept_methods(cap):
      model.apply({"params": params}, x, t, cond)
    return {k: (c["inputs"], c["output"]) for k, c in cap.calls.items()}

  values = run(params, x, t, cond)
  for k, (inputs, output) in values.items():
    cap.calls[k]["inputs"], cap.calls[k]["output"] = inputs, output
  return cap.calls


def _rounded_kernels(v_tree, base: dict, beta_hard: bool):
  """Kernels ``s * clip(floor(W / s) + h, -q_max, q_max)`` from rounding variables (hard: ``h >= 1/2``)."""
  out = {}
  for key, v in v_tree.items():
    b = base[key]
    h = rectified_sigmoid(v)
    if beta_hard:
      h = (h >= 0.5).astype(h.dtype)
    q = jnp.clip(b["floor"] + h, -b["q_max"], b["q_max"])
    out[key] = q * b["scale"]
  return out


def adaround(
  qmodel: QuantizedModel,
  params: Any,
  quant: Any,
  inputs: CalibrationInputs,
  *,
  num: int = 128,
  method: str = "time_aware",
  step: int = -1,
  iters: int = 500,
  batch_size: int = 32,
  learning_rate: float = 1e-3,
  reg: float = 0.01,
  beta: tuple[float, float] = (20.0, 2.0),
  warmup: float = 0.2,
  seed: int = 0,
  verbose: bool = False,
) -> tuple[Any, dict]:
  """Learns the rounding of every quantized kernel, block by block.

  Args:
    qmodel: the quantized model; ``quant`` must have been calibrated for its config.
    params: full-precision parameters.
    quant: the ``"quant"`` collection (weight and activation scales; unchanged).
    inputs: recorded full-precision model inputs; ``num`` examples chosen from them by
      :func:`~diffjax.quantization.select_inputs` with ``method`` (and ``step``, ``seed``) are the data.
    method: "time_aware" (examples spread evenly over the steps, as in Q-Diffusion), or the naive
      "single" (all from step ``step``) or "random" (one random step per example), so that AdaRound
      can be run on the same kind of data as a naive activation calibration.
    step: the step of ``method="single"`` (``-1``: the last, least noisy one).
    iters: Adam iterations per block on batches of ``batch_size`` examples.
    learning_rate: Adam step size on the rounding variables.
    reg: weight ``lambda`` of the rounding regulariser.
    beta: its exponent, annealed linearly from ``beta[0]`` to ``beta[1]`` after ``warmup * iters``
      iterations without the regulariser.
    seed: batch sampling seed.

  Returns:
    ``(params, report)``: parameters of the same structure whose quantized kernels are learned-rounded
    grid values, and per block ``{"nearest_mse", "adaround_mse", "seconds"}`` (reconstruction MSE of the
    block's output on all ``num`` examples with nearest and with learned rounding).
  """
  if iters < 1 or batch_size < 1 or num < 1:
    raise ValueError(f"iters, batch_size and num must be >= 1, got {iters}, {batch_size}, {num}")
  if method not in ("single", "random", "time_aware"):
    raise ValueError(f"method must be 'single', 'random' or 'time_aware', got {method!r}")
  ((x, t, cond),) = select_inputs(inputs, method=method, num=num, step=step, seed=seed)
  x, t = jnp.asarray(x), jnp.asarray(t)
  cond = jax.tree.map(jnp.asarray, cond)
  model, config = qmodel.model, qmodel.config
  calls = _capture(model, params, x, t, cond)
  flat_q = traverse_util.flatten_dict(quant)
  timesteps = quant["timesteps"]
  new_flat = dict(traverse_util.flatten_dict(params))
  report: dict[str, dict] = {}
  rng = np.random.default_rng(seed)
  n = x.shape[0]
  batch_size = min(batch_size, n)

  for name, call in calls.items():
    block_q = {k[1:]: v for k, v in flat_q.items() if k[0] == name}
    block_p = {k[1:]: v for k, v in traverse_util.flatten_dict(params).items() if k[0] == name}
    base, v0 = {}, {}
    for key, w_scale in block_q.items():
      if key[-1] != "w_scale":
        continue
      layer = key[:-1]
      kernel = jnp.asarray(block_p[layer + ("kernel",)], jnp.float32)
      bits = config.weight_bits((name,) + layer, "conv" if kernel.ndim >= 3 else "dense")
      if bits is None:
        continue
      _, q_max = int_range(bits, symmetric=True)
      w_scale = jnp.asarray(w_scale)
      if w_scale.shape[0] == 1:
        scale = jnp.broadcast_to(w_scale[0], kernel.shape)
      else:
        first = (jnp.arange(kernel.shape[-2]) < block_q[layer + ("w_split",)])[:, None]
        scale = jnp.where(first, w_scale[0], w_scale[1])
      ratio = kernel / scale
      base[layer + ("kernel",)] = {"floor": jnp.floor(ratio), "scale": scale, "q_max": q_max}
      v0[layer + ("kernel",)] = _init_v(ratio - jnp.floor(ratio))
    if not v0:
      continue
    module, treedef, leaves, arrays = call["module"], call["treedef"], call["leaves"], call["arrays"]
    quant_block = traverse_util.unflatten_dict(block_q)
    target = call["output"]

    def block_out(
      v_tree,
      idx,
      hard=False,
      _module=module,
      _base=base,
      _block_p=block_p,
      _qb=quant_block,
      _treedef=treedef,
      _leaves=leaves,
      _arrays=arrays,
      _inputs=call["inputs"],
    ):
      p = dict(_block_p)
      p.update(_rounded_kernels(v_tree, _base, hard))
      ls = list(_leaves)
      for i, a in zip(_arrays, _inputs):
        ls[i] = a[idx]
      args, kwargs = jax.tree.unflatten(_treedef, ls)
      # The block's layers see their whole-model paths, so per-layer bit overrides (stem, head) apply.
      icpt = _Interceptor(config, mode="quantize", t=t[idx], timesteps=timesteps, prefix=(name,))
      with nn.intercept_methods(icpt):
        return _module.apply({"params": traverse_util.unflatten_dict(p), QUANT: _qb}, *args, **kwargs)

    def rec_loss(out, idx, _target=target):
      errs = jax.tree.map(
        lambda o, r: jnp.sum(jnp.square(o - r[idx]).reshape(idx.shape[0], -1), axis=1), out, _target
      )
      return jnp.mean(sum(jax.tree.leaves(errs)))

    def loss_fn(v_tree, idx, b, use_reg, _block_out=block_out, _rec=rec_loss):
      rec = _rec(_block_out(v_tree, idx), idx)
      round_loss = sum(
        jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** b) for v in jax.tree.leaves(v_tree)
      )
      return rec + use_reg * reg * round_loss

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(v_tree, opt_state, idx, b, use_reg, _loss=loss_fn, _opt=opt):
      loss, g = jax.value_and_grad(_loss)(v_tree, idx, b, use_reg)
      updates, opt_state = _opt.update(g, opt_state, v_tree)
      return optax.apply_updates(v_tree, updates), opt_state, loss

    eval_mse = jax.jit(
      lambda v, hard, _bo=block_out, _rec=rec_loss: _rec(_bo(v, jnp.arange(n), hard), jnp.arange(n)),
      static_argnums=1,
    )
    t0 = time.perf_counter()
    nearest = float(eval_mse(v0, True))  # h(V0) = frac(W / s): hard rounding of it is rounding to nearest
    v_tree, opt_state = v0, opt.init(v0)
    start = int(warmup * iters)
    for i in range(iters):
      frac = max(0.0, (i - start) / max(iters - start, 1))
      b = beta[0] + (beta[1] - beta[0]) * frac
      idx = jnp.asarray(rng.choice(n, batch_size, replace=False))
      v_tree, opt_state, _ = step(v_tree, opt_state, idx, jnp.float32(b), jnp.float32(i >= start))
    learned = float(eval_mse(v_tree, True))
    report[name] = {
      "nearest_mse": nearest,
      "adaround_mse": learned,
      "seconds": round(time.perf_counter() - t0, 1),
    }
    if verbose:
      print(f"adaround {name}: block MSE {nearest:.4g} (nearest) -> {learned:.4g}", flush=True)
    if learned < nearest:  # otherwise the block keeps rounding to nearest
      for key, w in _rounded_kernels(v_tree, base, True).items():
        new_flat[(name,) + key] = w
  return traverse_util.unflatten_dict(new_flat), report
