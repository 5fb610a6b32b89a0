"""3x3 stride-1 "SAME" convolutions on CPU: oneDNN's direct kernel vs Winograd F(2x2, 3x3) and F(4x4, 3x3).

The shapes are the forward convolutions of the bench_unet U-Net (channels 32/64) at its three resolutions
(batch 64 for training, 16 for guided sampling's model batch). Winograd runs twice: as a call does in a
training step (the kernel transform ``G w G^T``, ``onednn_conv.winograd_weights``, computed with the
convolution) and with the transformed kernel given ("u given"), as in a sampling loop, where XLA's
loop-invariant code motion computes it once before the loop. Isolated calls keep one kernel hot in cache,
which favours F(4x4) (2.25x the transformed kernel of F(2x2)) on small maps; so the rule for maps under
12x12 is also timed where it matters, in ``bench_unet.py``'s guided DDIM sampler at 8x8x1 (maps 8x8 and
4x4), under alternative rules (``--sampler-rounds``; 0 skips it). Every variant of a shape is timed in the
same round, rounds alternate, and the speed-ups are medians of per-round ratios (load on the shared
cores hits both sides of a ratio alike). The max abs error against XLA's convolution at
``precision="highest"``, divided by the output's max abs value, is reported per variant. Results:
``experiments/results/bench_winograd.{json,md}``. ``diffjax.onednn_conv.winograd_tile`` picks F(4x4)
where this table shows it pays and its error stays under 1e-5.

    python experiments/bench_winograd.py [--rounds 5] [--sampler-rounds 11]
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
  (64, 8, 8, 32, 32),
  (64, 4, 4, 64, 64),
  (16, 28, 28, 32, 32),
  (16, 14, 14, 64, 64),
  (16, 32, 32, 64, 32),
  (16, 8, 8, 32, 32),
  (16, 8, 8, 96, 32),
  (16, 4, 4, 64, 64),
  (16, 4, 4, 128, 64),
)
VARIANTS = ("oneDNN direct", "F(2x2,3x3)", "F(4x4,3x3)", "F(2x2), u given", "F(4x4), u given")


def _variants(shape) -> dict:
  """The CPU kernels, called directly (diffjax.onednn_conv's own calls, without its choice): name ->
  (function, which of the kernel ``k``, ``u2`` or ``u4`` (transformed for F(2x2) or F(4x4)) it takes)."""
  n, h, w, _, o = shape
  return dict(zip(VARIANTS, (
    (lambda x, k: onednn_conv._call("fwd", (n, h, w, o), x, k, (1, 1), PADS), "k"),
    (lambda x, k: onednn_conv._winograd(x, k, 2), "k"),
    (lambda x, k: onednn_conv._winograd(x, k, 4), "k"),
    (lambda x, u: onednn_conv.winograd_conv(x, u, 2), "u2"),
    (lambda x, u: onednn_conv.winograd_conv(x, u, 4), "u4"),
  )))  # fmt: skip


def _label(tile: int) -> str:
  return f"F({tile}x{tile})" if tile else "direct"


def _time(fn, args, reps: int) -> float:
  """Mean seconds per call, each call waited for (calls left in flight would overlap XLA's own ops with
  the next call's, but not diffjax's custom calls, whose worker pool runs one call at a time)."""
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / reps


SAMPLER_RULES = {  # name -> tile for maps under 12x12 given (h, w); None: diffjax's own rule
  "diffjax's rule": None,
  "4x4 maps direct": lambda h, w: 0 if min(h, w) < 8 else 2,
  "4x4 maps F(4x4)": lambda h, w: 4 if min(h, w) < 8 else 2,
  "4x4 and 8x8 maps F(4x4)": lambda h, w: 4,
}


def _ruled(rule):
  def tile(x_shape, w_shape, strides, padding):
    m = winograd_tile(x_shape, w_shape, strides, padding)
    return rule(*x_shape[1:3]) if rule is not None and m and min(x_shape[1:3]) < 12 else m

  return tile


def sampler_rules(rounds: int, steps: int = 20) -> dict:
  """ms per guided DDIM step of bench_unet's 8x8x1 sampler (model batch 16) under each of SAMPLER_RULES."""
  from bench_unet import make_jax_sampler, setup

  p = setup("8x8x1", 8, 8)
  args = (p["params"], jnp.asarray(p["x_T"]), jnp.asarray(p["s_labels"]))
  fns = {}
  for name, rule in SAMPLER_RULES.items():
    onednn_conv.winograd_tile = _ruled(rule)  # read when the sampler is traced
    try:
      sampler = make_jax_sampler(p["model"], p["schedule"], 2.0)
      fns[name] = jax.jit(lambda *a, _f=sampler: _f(*a))  # a new trace per rule
      jax.block_until_ready(fns[name](*args, jnp.int32(2)))
    finally:
      onednn_conv.winograd_tile = winograd_tile
  times = {name: [] for name in fns}
  for r in range(rounds):
    names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
    for name in names:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](*args, jnp.int32(steps)))
      times[name].append((time.perf_counter() - t0) / steps)
  base = np.asarray(times["diffjax's rule"])
  return {
    name: {
      "ms_per_step": float(np.median(t)) * 1e3,
      "speedup_vs_diffjax_rule": float(np.median(base / np.asarray(t))),
    }
    for name, t in times.items()
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=10, help="calls per variant per round")
  ap.add_argument("--sampler-rounds", type=int, default=11, help="rounds of the sampler timing (0: skip)")
  a = ap.parse_args()
  if a.rounds < 1 or a.reps < 1 or a.sampler_rounds < 0:
    ap.error(
      f"--rounds and --reps must be positive and --sampler-rounds >= 0, got {a.rounds}, {a.reps}, {a.sampler_rounds}"
    )
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
    weights = {"k": k, "u2": onednn_conv.winograd_weights(k, 2), "u4": onednn_conv.winograd_weights(k, 4)}
    variants = _variants(shape)
    fns = {name: jax.jit(f) for name, (f, _) in variants.items()}
    inputs = {name: (x, weights[which]) for name, (_, which) in variants.items()}
    errors = {name: float(jnp.max(jnp.abs(f(*inputs[name]) - ref))) / scale for name, f in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(2):  # warm-up
      for name, f in fns.items():
        _time(f, inputs[name], 2)
    for r in range(a.rounds):
      names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
      for name in names:
        times[name].append(_time(fns[name], inputs[name], a.reps))
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
  sampler = sampler_rules(a.sampler_rounds) if a.sampler_rounds else None
  print(sampler, flush=True)
  result = {
    "command": "python " + " ".join(["experiments/bench_winograd.py", *sys.argv[1:]]),
    "machine": machine(),
    "jax": jax.__version__,
    "rounds": a.rounds,
    "reps": a.reps,
    "load_average_start_end": [load0, os.getloadavg()[0]],
    "rows": rows,
    "sampler_rounds": a.sampler_rounds,
    "sampler_8x8x1": sampler,
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
    (
      "| N, H, W, C, O | ms direct / F(2x2) / F(4x4) | speed-up F(2x2) / F(4x4) | same, u given | "
      "error F(2x2) / F(4x4) | diffjax uses |"
    ),
    "|---|---|---|---|---|---|",
  ]
  for row in rows:
    ms, sp, err = row["ms"], row["speedup_vs_direct"], row["relative_error"]
    lines.append(
      f"| {', '.join(map(str, row['shape']))} | {ms['oneDNN direct']:.2f} / {ms['F(2x2,3x3)']:.2f} / "
      f"{ms['F(4x4,3x3)']:.2f} | {sp['F(2x2,3x3)']:.2f}x / {sp['F(4x4,3x3)']:.2f}x | "
      f"{sp['F(2x2), u given']:.2f}x / {sp['F(4x4), u given']:.2f}x | "
      f"{err['F(2x2,3x3)']:.1e} / {err['F(4x4,3x3)']:.1e} | {_label(row['diffjax_tile'])} |"
    )
  if sampler:
    lines += [
      "",
      (
        f"bench_unet's guided DDIM sampler at 8x8x1 (model batch 16, maps 8x8 and 4x4), {a.sampler_rounds} "
        "rounds of 20 steps, rules alternating; speed-up: median over rounds of the per-round ratio to "
        "diffjax's rule.\n"
      ),
      "| rule for maps under 12x12 | ms per step | speed-up vs diffjax's rule |",
      "|---|---|---|",
      *(
        f"| {name} | {v['ms_per_step']:.2f} | {v['speedup_vs_diffjax_rule']:.2f}x |"
        for name, v in sampler.items()
      ),
    ]
  write_results("bench_winograd", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
