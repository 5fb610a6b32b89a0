"""Token dense layers on CPU: XLA's dots vs oneDNN 1x1 convolutions, forward and backward.

The layers are the U-Net attention projections of bench_unet (64 channels in and out) over the token
counts of its attention levels (4x4, 14x14, 16x16 maps) at training's batch 64 and sampling's batch 16,
and its ResNet blocks' 1x1 shortcut convolutions (the same product over pixels; 128 -> 64 and 96 -> 32
channels on 4x4, 8x8, 14x14 and 28x28 maps). Every call is waited for.
Forward: ``x @ w + b`` by diffjax's native product with the bias fused (``csrc/dense.cc``, what
``diffjax.models.conv.Dense`` and the 1x1 convolutions run) against XLA's dot plus the bias and oneDNN's
1x1 convolution plus the bias; backward: both gradients by XLA's dots against oneDNN's backward-data and
backward-weights primitives (what ``diffjax.onednn_dense`` runs from ``BACKWARD_MIN_ROWS`` rows). All
variants of a shape are timed in each round, rounds alternate, ratios are medians of per-round ratios.
Results: ``experiments/results/bench_dense_grad.{json,md}``.

    python experiments/bench_dense_grad.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from diffjax.host_memory import reexec_with_tuned_malloc

if __name__ == "__main__":
  reexec_with_tuned_malloc()

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_winograd import _time
from trained_run import machine, write_results

from diffjax import cpu_kernels, onednn_conv, onednn_dense

SHAPES = (  # (batch, tokens, channels in, out)
  (64, 16, 64, 64),
  (64, 196, 64, 64),
  (64, 256, 64, 64),
  (16, 16, 64, 64),
  (16, 196, 64, 64),
  (16, 256, 64, 64),
  (16, 16, 128, 64),  # shortcuts: sampling at 8x8x1 (4x4 and 8x8 maps)
  (16, 64, 96, 32),
  (64, 64, 96, 32),  # training at 8x8x1
  (16, 196, 128, 64),  # sampling at 28x28x1 (14x14 and 28x28 maps)
  (16, 784, 96, 32),
  (64, 784, 96, 32),  # training at 28x28x1
)
VALID = ((0, 0), (0, 0))


def _onednn_forward(x, w, b):
  """oneDNN's forward 1x1 convolution (called directly: diffjax's own 1x1 forward is XLA's dot)."""
  out = (x.shape[0], x.shape[1], 1, w.shape[1])
  return onednn_conv._call("fwd", out, x[:, :, None, :], w[None, None], (1, 1), VALID)[:, :, 0, :] + b


def _median_ratio(num: list, den: list) -> float:
  return float(np.median(np.asarray(num) / np.asarray(den)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=20, help="calls per variant per round")
  a = ap.parse_args()
  if a.rounds < 1 or a.reps < 1:
    ap.error(f"--rounds and --reps must be positive, got {a.rounds} and {a.reps}")
  if not cpu_kernels.enabled():
    raise SystemExit(f"diffjax's CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
  t_start, load0 = time.perf_counter(), os.getloadavg()[0]
  rows = []
  for batch, tokens, cin, cout in SHAPES:
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (batch, tokens, cin))
    w = jax.random.normal(keys[1], (cin, cout)) / np.sqrt(cin)
    b = jax.random.normal(keys[2], (cout,))
    dy = jax.random.normal(keys[3], (batch, tokens, cout))
    fns = {
      "forward xla": (jax.jit(lambda x, w, b: onednn_dense._plain(x, w) + b), (x, w, b)),
      "forward onednn": (jax.jit(_onednn_forward), (x, w, b)),
      "forward native": (
        jax.jit(lambda x, w, b: onednn_conv.native_dense(x, w, b, cpu_kernels.threads())),
        (x, w, b),
      ),
      "backward xla": (jax.jit(onednn_dense._plain_grads), (x, w, dy)),
      "backward onednn": (jax.jit(onednn_dense._onednn_grads), (x, w, dy)),
    }
    times = {name: [] for name in fns}
    for f, args in fns.values():  # warm-up
      _time(f, args, 3)
    for r in range(a.rounds):
      names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
      for name in names:
        f, args = fns[name]
        times[name].append(_time(f, args, a.reps))
    row = {
      "batch": batch,
      "tokens": tokens,
      "channels": [cin, cout],
      "rows": batch * tokens,
      "ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
      "onednn_speedup_forward": _median_ratio(times["forward xla"], times["forward onednn"]),
      "native_speedup_forward": _median_ratio(times["forward xla"], times["forward native"]),
      "onednn_speedup_backward": _median_ratio(times["backward xla"], times["backward onednn"]),
      "diffjax_backward": "onednn" if batch * tokens >= onednn_dense.BACKWARD_MIN_ROWS else "xla",
    }
    rows.append(row)
    print(row, flush=True)
  result = {
    "command": "python " + " ".join(["experiments/bench_dense_grad.py", *sys.argv[1:]]),
    "machine": machine(),
    "jax": jax.__version__,
    "rounds": a.rounds,
    "reps": a.reps,
    "load_average_start_end": [load0, os.getloadavg()[0]],
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  lines = [
    "# bench_dense_grad: token dense layers and 1x1 convolutions: XLA's dots, oneDNN, diffjax's native forward\n",
    (
      f"`{result['command']}` on {result['machine']}, jax {jax.__version__}; "
      f"{a.rounds} rounds x {a.reps} calls, variants alternating; load average {load0:.1f} at start, "
      f"{os.getloadavg()[0]:.1f} at end; every call waited for. Speed-up: median over rounds of XLA time / "
      "oneDNN (or native) time. Forward includes the bias add (native: inside the product); backward computes both gradients. diffjax runs the native forward (dense layers and "
      f"1x1 convolutions) and uses oneDNN's backward from {onednn_dense.BACKWARD_MIN_ROWS} rows (dense layers; "
      "1x1 convolutions always).\n"
    ),
    (
      "| batch x tokens (rows), channels | forward ms XLA / oneDNN / native | speed-up forward oneDNN / native | "
      "backward ms XLA / oneDNN | "
      "oneDNN speed-up backward | diffjax backward |"
    ),
    "|---|---|---|---|---|---|",
  ]
  for row in rows:
    ms = row["ms"]
    lines.append(
      f"| {row['batch']} x {row['tokens']} ({row['rows']}), {row['channels'][0]} -> {row['channels'][1]} | {ms['forward xla']:.3f} / {ms['forward onednn']:.3f} "
      f"/ {ms['forward native']:.3f} | {row['onednn_speedup_forward']:.2f}x / {row['native_speedup_forward']:.2f}x | {ms['backward xla']:.3f} / {ms['backward onednn']:.3f} | "
      f"{row['onednn_speedup_backward']:.2f}x | {row['diffjax_backward']} |"
    )
  write_results("bench_dense_grad", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
