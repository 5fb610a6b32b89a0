"""How long diffjax's CPU kernel workers should spin between calls: ``DIFFJAX_CPU_SPIN_US`` on the U-Net.

diffjax's custom calls split their work over their own worker threads (``diffjax/csrc/workers.h``). A
worker that finds no work spins for ``DIFFJAX_CPU_SPIN_US`` microseconds and then sleeps on a condition
variable; the next call then pays a futex wake-up. A guided sampling step of ``bench_unet.py``'s U-Net
makes about 90 custom calls with XLA's own ops (tens to hundreds of microseconds each) between them,
so the spin decides whether the workers are awake when the next call comes; spinning also holds the
second core while XLA runs its own ops. The library reads the variable at every call, so one compiled
function runs under every setting: per round each setting runs once, in alternating order, after one
untimed call under it. Timed: guided DDIM sampling (model batch 16) at 8x8x1 and 28x28x1, and the AdamW
training step (batch 64) at 8x8x1 and 28x28x1. Speed-up: median over rounds of the per-round ratio of the
default's time (200 us, ``diffjax.cpu_kernels.DEFAULT_SPIN_US``) to the setting's. Results:
``experiments/results/bench_worker_spin.{json,md}``.

    python experiments/bench_worker_spin.py [--rounds 9]   (~3 min)
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
from bench_unet import make_jax_sampler, new_state, setup
from trained_run import machine, write_results

from diffjax import cpu_kernels

SETTINGS = ("0", "50", "200", "1000")  # microseconds; 50 was the fixed spin before the setting existed
DEFAULT = str(cpu_kernels.DEFAULT_SPIN_US)
CASES = (  # (name, resolution, kind, units per timed run)
  ("sampling 8x8x1", "8x8x1", "sample", 20),
  ("sampling 28x28x1", "28x28x1", "sample", 5),
  ("training 8x8x1", "8x8x1", "train", 10),
  ("training 28x28x1", "28x28x1", "train", 1),
)


def _runner(res: str, kind: str, units: int):
  """A function running ``units`` DDIM steps or training steps and waiting for them."""
  if kind == "sample":
    p = setup(res, 8, 8)
    args = (p["params"], jnp.asarray(p["x_T"]), jnp.asarray(p["s_labels"]))
    sample = make_jax_sampler(p["model"], p["schedule"], 2.0)
    return lambda: jax.block_until_ready(sample(*args, jnp.int32(units)))
  p = setup(res, 64, 8)
  holder, key = {"state": new_state(p)}, jax.random.key(2)

  def run():
    for _ in range(units):
      holder["state"], m = p["step"](holder["state"], p["batch"], key)
    jax.block_until_ready(m)

  return run


def time_settings(run, rounds: int) -> dict:
  run()  # compile and warm up
  times = {s: [] for s in SETTINGS}
  try:
    for r in range(rounds):
      order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
      for s in order:
        os.environ[cpu_kernels.SPIN_ENV] = s  # nothing runs while it changes
        run()  # untimed: the workers settle into the setting
        t0 = time.perf_counter()
        run()
        times[s].append(time.perf_counter() - t0)
  finally:
    os.environ.pop(cpu_kernels.SPIN_ENV, None)
  base = np.asarray(times[DEFAULT])
  return {
    s: {"ms": float(np.median(t)) * 1e3, "speedup_vs_default": float(np.median(base / np.asarray(t)))}
    for s, t in times.items()
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=9)
  a = ap.parse_args()
  if a.rounds < 1:
    ap.error(f"--rounds must be positive, got {a.rounds}")
  if not cpu_kernels.enabled():
    raise SystemExit(f"diffjax's CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
  if cpu_kernels.SPIN_ENV in os.environ:
    raise SystemExit(f"unset {cpu_kernels.SPIN_ENV}: this benchmark sets it itself")
  t_start, load0 = time.perf_counter(), os.getloadavg()[0]
  rows = []
  for name, res, kind, units in CASES:
    row = {
      "case": name,
      "units_per_run": units,
      "settings": time_settings(_runner(res, kind, units), a.rounds),
    }
    rows.append(row)
    print(row, flush=True)
  load1 = os.getloadavg()[0]
  result = {
    "command": "python " + " ".join(["experiments/bench_worker_spin.py", *sys.argv[1:]]),
    "machine": machine(),
    "jax": jax.__version__,
    "rounds": a.rounds,
    "default_spin_us": cpu_kernels.DEFAULT_SPIN_US,
    "load_average_start_end": [load0, load1],
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  head = " | ".join(f"{s} us" for s in SETTINGS)
  lines = [
    "# bench_worker_spin: DIFFJAX_CPU_SPIN_US on bench_unet's U-Net\n",
    (
      f"`{result['command']}` on {result['machine']}, jax {jax.__version__}; {a.rounds} rounds, settings "
      f"alternating; load average {load0:.1f} at start, {load1:.1f} at end. Cells: median ms per run (sampling: "
      "20 DDIM steps at 8x8x1, 5 at 28x28x1, model batch 16; training: 10 steps at 8x8x1, 1 at 28x28x1, batch "
      f"64), then the median per-round speed-up against the default ({DEFAULT} us).\n"
    ),
    f"| case | {head} |",
    "|---|" + "---|" * len(SETTINGS),
  ]
  for row in rows:
    cells = " | ".join(
      f"{v['ms']:.1f} ms ({v['speedup_vs_default']:.2f}x)" for v in (row["settings"][s] for s in SETTINGS)
    )
    lines.append(f"| {row['case']} | {cells} |")
  write_results("bench_worker_spin", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
