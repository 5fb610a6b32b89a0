"""3x3 stride-1 "SAME" convolutions on CPU: oneDNN's direct kernel vs Winograd F(2x2, 3x3) and F(4x4, 3x3).

The shapes are the forward convolutions of the bench_unet U-Net (channels 32/64) at its three resolutions
(batch 64 for training, 16 for guided sampling's model batch). Every variant of a shape is timed in the
same round, rounds alternate, and the speed-ups are medians of per-round ratios (load on the shared
cores hits both sides of a ratio alike). The max abs error against XLA's convolution at
``precision="highest"``, divided by the output's max abs value, is reported per variant. Results:
``experiments/results/bench_winograd.{json,md}``. ``diffjax.onednn_conv.winograd_tile`` picks F(4x4)
where this table shows it pays and its error stays under 1e-5.

    python experiments/bench_winograd.py [--rounds 5]
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import machine, write_results

from diffjax import cpu_kernels, onednn_conv
from diffjax.onednn_conv import winograd_tile

PADS = ((1, 1), (1, 1))
SHAPES = (  # (N, H, W, C, O)
  (64, 28, 28, 32, 32),
  (64, 28, 28, 96, 32),
  (64, 14, 14, 64, 64),
  (64, 32, 32, 32, 32),
  (16, 28, 28, 32, 32),
  (16, 14, 14, 64, 64),
  (16, 32, 32, 64, 32),
  (16, 8, 8, 32, 32),
  (16, 4, 4, 64, 64),
)


def _variants(shape) -> dict:
  """The three CPU kernels, called directly (diffjax.onednn_conv's own calls, without its choice)."""
  n, h, w, _, o = shape
  return {
    "oneDNN direct": lambda x, k: onednn_conv._call("fwd", (n, h, w, o), x, k, (1, 1), PADS),
    "F(2x2,3x3)": lambda x, k: onednn_conv._winograd(x, k, 2),
    "F(4x4,3x3)": lambda x, k: onednn_conv._winograd(x, k, 4),
  }


def _label(tile: int) -> str:
  return f"F({tile}x{tile})" if tile else "direct"


def _time(fn, args, reps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(reps):
    r = fn(*args)
  jax.block_until_ready(r)
  return (time.perf_counter() - t0) / reps


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=10, help="calls per variant per round")
  a = ap.parse_args()
  if a.rounds < 1 or a.reps < 1:
    ap.error(f"--rounds and --reps must be positive, got {a.rounds} and {a.reps}")
  if not cpu_kernels.enabled():
    raise SystemExit(f"diffjax's CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
  t_start, load0 = time.perf_counter(), os.getloadavg()[0]
  rows = []
  for shape in SHAPES:
    n, h, w, c, o = shape
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (n, h, w, c))
    k = jax.random.normal(keys[1], (3, 3, c, o)) / np.sqrt(9 * c)
    ref = jax.lax.conv_general_dilated(
      x, k, (1, 1), PADS, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    scale = float(jnp.max(jnp.abs(ref)))
    fns = {name: jax.jit(f) for name, f in _variants(shape).items()}
    errors = {name: float(jnp.max(jnp.abs(f(x, k) - ref))) / scale for name, f in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(2):  # warm-up
      for f in fns.values():
        _time(f, (x, k), 2)
    for r in range(a.rounds):
      names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
      for name in names:
        times[name].append(_time(fns[name], (x, k), a.reps))
    base = np.asarray(times["oneDNN direct"])
    row = {
      "shape": list(shape),
      "ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
      "speedup_vs_direct": {name: float(np.median(base / np.asarray(t))) for name, t in times.items()},
      "relative_error": errors,
      "diffjax_tile": winograd_tile((n, h, w, c), (3, 3, c, o), (1, 1), PADS),
    }
    rows.append(row)
    print(row, flush=True)
  result = {
    "command": "python " + " ".join(["experiments/bench_winograd.py", *sys.argv[1:]]),
    "machine": machine(),
    "jax": jax.__version__,
    "rounds": a.rounds,
    "reps": a.reps,
    "load_average_start_end": [load0, os.getloadavg()[0]],
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  lines = [
    "# bench_winograd: 3x3 SAME convolutions, oneDNN direct vs Winograd\n",
    (
      f"`{result['command']}` on {result['machine']}, jax {jax.__version__}; {a.rounds} rounds x {a.reps} calls, "
      f"variants alternating; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end. Speed-up: "
      "median over rounds of direct time / variant time. Error: max abs difference from XLA's convolution "
      "(`precision=highest`) over the output's max abs value. diffjax uses: `winograd_tile` (0: the direct "
      "kernel).\n"
    ),
    "| N, H, W, C, O | ms direct / F(2x2) / F(4x4) | speed-up F(2x2) / F(4x4) | error F(2x2) / F(4x4) | diffjax uses |",
    "|---|---|---|---|---|",
  ]
  for row in rows:
    ms, sp, err = row["ms"], row["speedup_vs_direct"], row["relative_error"]
    lines.append(
      f"| {', '.join(map(str, row['shape']))} | {ms['oneDNN direct']:.2f} / {ms['F(2x2,3x3)']:.2f} / "
      f"{ms['F(4x4,3x3)']:.2f} | {sp['F(2x2,3x3)']:.2f}x / {sp['F(4x4,3x3)']:.2f}x | "
      f"{err['F(2x2,3x3)']:.1e} / {err['F(4x4,3x3)']:.1e} | {_label(row['diffjax_tile'])} |"
    )
  write_results("bench_winograd", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
