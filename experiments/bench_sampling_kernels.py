"""The U-Net's sampling kernels on CPU side by side: diffjax's native kernels, their alternatives, PyTorch.

At the shapes of ``bench_unet.py``'s guided DDIM sampling (model batch 16: 8 images and their
unconditional twins; channels 32 / 64; attention on 14x14 and 16x16 maps, head size 8), each kernel's
forward, which is all that sampling runs:

* attention ``softmax(q k^T / sqrt(d)) v``: the AVX-512 kernel vectorised over queries (the default
  where the CPU has AVX-512), the portable kernel vectorised over keys (``DIFFJAX_CPU_AVX512=0``),
  diffjax's blocked XLA attention (``DIFFJAX_CPU_KERNELS=xla``) and ``torch``'s
  ``scaled_dot_product_attention``;
* GroupNorm(8 groups) + SiLU: the AVX-512 two-pass kernel, the portable three-pass kernel, diffjax's
  XLA formulation and ``torch`` ``group_norm`` + ``silu`` (channels-last input, as the U-Net has it);
* the token dense layers (64 -> 64 plus bias): diffjax's native product with the bias fused
  (``diffjax.onednn_dense.dense_bias``, what ``diffjax.models.conv.Dense`` runs), XLA's dot plus bias
  (``DIFFJAX_CPU_KERNELS=xla``) and ``torch`` ``linear``.

Each jax variant is compiled with its setting in the environment (the kernels read them at trace time),
every call is waited for, and all variants of a shape run once per round in rotating order, each after
30 ms of untimed calls (PyTorch's OpenMP workers spin for milliseconds after a call and would take a
core from the next variant); times are medians over rounds, and
speed-ups medians over rounds of per-round ratios against diffjax's default. Results:
``experiments/results/bench_sampling_kernels.{json,md}``.

    python experiments/bench_sampling_kernels.py [--rounds 7 --reps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from diffjax.host_memory import reexec_with_tuned_malloc

if __name__ == "__main__":
  reexec_with_tuned_malloc()

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import machine, write_results

from diffjax import cpu_kernels, onednn_dense
from diffjax.models.attention_kernels import blocked_attention
from diffjax.models.group_norm import group_norm

BATCH = 16
ATTENTION = ((196, 8, 8), (256, 8, 8))  # (tokens, heads, head size): 14x14 and 16x16 maps, 64 channels
NORM = ((32, 32, 32), (32, 32, 64), (32, 32, 96), (16, 16, 64), (16, 16, 128))  # (H, W, C), GroupNorm(8)
DENSE = (196, 256)  # tokens of the 64 -> 64 projections


@contextlib.contextmanager
def _env(**values):
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _compiled(fn, args, **env):
  """``fn`` jitted, traced and compiled (by a first call) with ``env`` set. A new function each time:
  jit's trace cache would otherwise hand back the first variant's. Later calls reuse the executable
  through jit's C++ dispatch path (calling a ``.lower().compile()`` object instead costs a Python-level
  argument check per call, a sizeable part of these sub-millisecond kernels)."""
  f = jax.jit(lambda *a: fn(*a))
  with _env(**env):
    jax.block_until_ready(f(*args))
  return f


def _torch(fn, args, reps: int) -> float:
  with torch.inference_mode():
    t0 = time.perf_counter()
    for _ in range(reps):
      fn(*args)
    return (time.perf_counter() - t0) / reps


def _run(variants: dict, rounds: int, reps: int) -> dict:
  """Times every variant once per round in rotating order: median ms and median ratios to the first."""
  names = list(variants)
  for name in names:  # warm-up
    variants[name](3)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      # untimed calls for 30 ms first: the previous variant's idle threads spin for a while after its
      # last call (PyTorch's OpenMP workers for milliseconds) and would take a core from this one
      t0 = time.perf_counter()
      while time.perf_counter() - t0 < 0.03:
        variants[name](2)
      times[name].append(variants[name](reps))
  t = {k: np.asarray(v) for k, v in times.items()}
  first = names[0]
  return {
    "ms": {k: float(np.median(v)) * 1e3 for k, v in t.items()},
    "speedup_of_default": {k: float(np.median(v / t[first])) for k, v in t.items() if k != first},
  }


def _jax(fn, args):
  """Seconds per call, each call waited for: the calls are not left to overlap (JAX's CPU client would
  run independent executions concurrently, and the native kernels would then wait for each other)."""

  def run(reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / reps

  return run


def attention_rows(rounds: int, reps: int) -> list:
  rows = []
  for tokens, heads, d in ATTENTION:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (BATCH, tokens, heads, d)) for key in keys)
    args = (q, k, v)
    qt, kt, vt = (torch.from_numpy(np.asarray(a).transpose(0, 2, 1, 3).copy()) for a in args)
    variants = {
      "native AVX-512": _jax(_compiled(blocked_attention, args), args),
      "native portable": _jax(_compiled(blocked_attention, args, DIFFJAX_CPU_AVX512="0"), args),
      "xla blocked": _jax(_compiled(blocked_attention, args, DIFFJAX_CPU_KERNELS="xla"), args),
      "torch": lambda reps, a=(qt, kt, vt): _torch(torch.nn.functional.scaled_dot_product_attention, a, reps),
    }
    row = {"shape": f"{BATCH}x{tokens} tokens, {heads} heads of {d}", **_run(variants, rounds, reps)}
    rows.append(row)
    print(row, flush=True)
  return rows


def norm_rows(rounds: int, reps: int) -> list:
  rows = []

  def fn(x, s, b):
    return group_norm(x, s, b, num_groups=8, silu=True)

  def tfn(x, s, b):
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8, s, b))

  for h, w, c in NORM:
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (BATCH, h, w, c)) + 0.5
    args = (x, jax.random.normal(keys[1], (c,)), jax.random.normal(keys[2], (c,)))
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    xt = xt.contiguous(memory_format=torch.channels_last)
    st, bt = (torch.from_numpy(np.asarray(a)) for a in args[1:])
    variants = {
      "native AVX-512": _jax(_compiled(fn, args), args),
      "native portable": _jax(_compiled(fn, args, DIFFJAX_CPU_AVX512="0"), args),
      "xla": _jax(_compiled(fn, args, DIFFJAX_CPU_KERNELS="xla"), args),
      "torch": lambda reps, a=(xt, st, bt): _torch(tfn, a, reps),
    }
    row = {"shape": f"{BATCH}x{h}x{w}x{c}", **_run(variants, rounds, reps)}
    rows.append(row)
    print(row, flush=True)
  return rows


def dense_rows(rounds: int, reps: int) -> list:
  rows = []
  for tokens in DENSE:
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (BATCH, tokens, 64))
    args = (x, jax.random.normal(keys[1], (64, 64)) / 8.0, jax.random.normal(keys[2], (64,)))
    xt, wt, bt = (torch.from_numpy(np.asarray(a).copy()) for a in args)
    wt = wt.T.contiguous()
    variants = {
      "native": _jax(_compiled(onednn_dense.dense_bias, args), args),
      "xla": _jax(
        _compiled(lambda x, w, b: jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))) + b, args), args
      ),
      "torch": lambda reps, a=(xt, wt, bt): _torch(torch.nn.functional.linear, a, reps),
    }
    row = {"shape": f"{BATCH}x{tokens} tokens, 64 -> 64", **_run(variants, rounds, reps)}
    rows.append(row)
    print(row, flush=True)
  return rows


def _table(title: str, rows: list) -> list[str]:
  names = list(rows[0]["ms"])
  default, others = names[0], names[1:]
  lines = [
    f"\n## {title}\n",
    f"| shape | ms {' / '.join(names)} | {default} speed-up over {' / '.join(others)} |",
    "|---|---|---|",
  ]
  for row in rows:
    ms = " / ".join(f"{row['ms'][n]:.3f}" for n in names)
    up = " / ".join(f"{row['speedup_of_default'][n]:.2f}x" for n in others)
    lines.append(f"| {row['shape']} | {ms} | {up} |")
  return lines


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--reps", type=int, default=20, help="calls per variant per round")
  a = ap.parse_args()
  if a.rounds < 1 or a.reps < 1:
    ap.error(f"--rounds and --reps must be positive, got {a.rounds} and {a.reps}")
  if not cpu_kernels.enabled():
    raise SystemExit(f"diffjax's CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
  torch.set_num_threads(os.cpu_count())
  t_start, load0 = time.perf_counter(), os.getloadavg()[0]
  result = {
    "command": "python " + " ".join(["experiments/bench_sampling_kernels.py", *sys.argv[1:]]),
    "machine": machine(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "rounds": a.rounds,
    "reps": a.reps,
    "attention": attention_rows(a.rounds, a.reps),
    "group_norm_silu": norm_rows(a.rounds, a.reps),
    "dense": dense_rows(a.rounds, a.reps),
  }
  result["load_average_start_end"] = [load0, os.getloadavg()[0]]
  result["wall_s"] = round(time.perf_counter() - t_start, 1)
  lines = [
    "# bench_sampling_kernels: the U-Net's sampling kernels, diffjax's native ones vs alternatives and PyTorch\n",
    (
      f"`{result['command']}` on {result['machine']}, jax {jax.__version__}, torch {torch.__version__} "
      f"({result['torch_threads']} threads); forward passes at guided sampling's model batch {BATCH}; "
      f"{a.rounds} rounds x {a.reps} calls, variants alternating; load average {load0:.1f} at start, "
      f"{os.getloadavg()[0]:.1f} at end. Times: medians over rounds; speed-up: median over rounds of the "
      "variant's time / diffjax's default's (the first column). native portable: `DIFFJAX_CPU_AVX512=0`; "
      "xla: `DIFFJAX_CPU_KERNELS=xla`."
    ),
  ]
  lines += _table("Attention (head size 8)", result["attention"])
  lines += _table("GroupNorm(8) + SiLU", result["group_norm_silu"])
  lines += _table("Token dense layers (with bias)", result["dense"])
  write_results("bench_sampling_kernels", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
