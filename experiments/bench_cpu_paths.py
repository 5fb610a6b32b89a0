"""Ablation of diffjax's CPU fast paths on the U-Net training step, alternated in one process.

The train step of ``bench_unet``'s U-Net (diffusers ``UNet2DModel`` layout, channels (32, 64), batch
64, AdamW, eps loss) compiled with each fast path switched on in turn:

* ``plain``: ``attention_impl="xla"``, ``norm_impl="xla"`` (Flax/XLA as is);
* ``+attention``: blocked attention with a hand-written VJP (``attention_kernels``);
* ``+groupnorm``: also the per-channel GroupNorm(+SiLU) with a hand-written VJP (``group_norm``) --
  both, which is what ``"auto"`` selects on CPU;

each with :func:`diffjax.host_memory.keep_freed_memory` (``tuned malloc``), and ``+attention`` (main's
CPU default before ``group_norm`` and ``host_memory``) and ``+groupnorm`` also with glibc's default
allocator settings (toggled between runs with ``mallopt``), next to PyTorch (diffusers' model, same
weights and step, tuned malloc) with one thread and with ``os.cpu_count()`` threads. Every round runs
every row once in rotating order; ratios are medians over rounds of per-round time ratios. Each
resolution is set up, compiled and timed on its own.

A blocked im2col convolution weight gradient with a hand-written VJP was measured here too (commit
aba50ed, ``experiments/results/bench_cpu_paths.md``) and dropped: 0.94-1.00x at batch 64 once the
allocator is tuned.

Run:   python experiments/bench_cpu_paths.py            (28x28x1 and 32x32x3, batch 64; ~10 min on 2 cores)
       python experiments/bench_cpu_paths.py --quick    (8x8x1, batch 8: a smoke run)
Writes experiments/results/bench_cpu_paths.json and .md (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_unet as B

from diffjax.host_memory import keep_freed_memory, restore_default_malloc
from diffjax.models import UNet
from diffjax.training.step import compile_train_step, make_train_step

VARIANTS = {
  "plain": {"attention_impl": "xla", "norm_impl": "xla"},
  "+attention": {"attention_impl": "blocked", "norm_impl": "xla"},
  "+groupnorm": {"attention_impl": "blocked", "norm_impl": "fused"},
}


# Rows: (label, run name, tuned malloc). ``+attention, default malloc`` is main's CPU default before
# group_norm and host_memory; ``+groupnorm, tuned malloc`` is what ``"auto"`` and keep_freed_memory select.
def _configs(torch_n: int) -> list[tuple[str, str, bool]]:
  rows = [(f"{k}, tuned malloc", k, True) for k in VARIANTS]
  rows += [(f"{k}, default malloc", k, False) for k in ("+attention", "+groupnorm")]
  rows += [(f"torch{n}t, tuned malloc", f"torch{n}t", True) for n in sorted({1, torch_n})]
  return rows


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_resolution(res: str, batch: int, rounds: int) -> dict:
  """Every row of :func:`_configs` at one resolution, alternated over ``rounds`` rounds."""
  p = B.setup(res, batch, 2)
  c = p["res"][2]
  key = jax.random.key(2)
  runs, compile_s = {}, {}
  for name, impls in VARIANTS.items():
    model = UNet(
      in_channels=c, out_channels=c, attention_levels=(False, True), num_classes=B.NUM_CLASSES, **B.ARCH, **impls
    )  # fmt: skip
    step = make_train_step(
      model=model, schedule=p["schedule"], tx=p["tx"], cond_drop_prob=B.DROP, ema_decay=B.EMA
    )
    holder = {"state": B.new_state(p)}
    t0 = time.perf_counter()
    compiled = compile_train_step(step, p["mesh"]).lower(holder["state"], p["batch"], key).compile()
    compile_s[name] = time.perf_counter() - t0
    print(f"{res} {name}: compiled in {compile_s[name]:.0f}s", flush=True)

    def run(compiled=compiled, holder=holder):
      holder["state"], m = compiled(holder["state"], p["batch"], key)
      jax.block_until_ready(m)

    runs[name] = run
  n = os.cpu_count()
  trainer = B.TorchTrainer(p["torch_model"], np.asarray(p["schedule"].alphas_cumprod))
  runs["torch1t"] = B.with_threads(lambda: trainer.step(*p["t_batch"]), 1)
  runs[f"torch{n}t"] = lambda: trainer.step(*p["t_batch"])
  configs = _configs(n)
  for fn in runs.values():  # warm-up
    fn()
  names = [k for k, _, _ in configs]
  wall, cpu, faults = ({k: [] for k in names} for _ in range(3))
  for r in range(rounds):
    order = configs[r % len(configs) :] + configs[: r % len(configs)]
    for k, run_name, tuned in order:
      keep_freed_memory() if tuned else restore_default_malloc()
      f0, c0, t0 = minor_faults(), cpu_seconds(), time.perf_counter()
      runs[run_name]()
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(cpu_seconds() - c0)
      faults[k].append(minor_faults() - f0)
    times = ", ".join(f"{k} {wall[k][-1]:.2f}s" for k in names)
    print(f"{res} round {r} (load {os.getloadavg()[0]:.1f}): {times}", flush=True)
  keep_freed_memory()
  w = {k: np.array(v) for k, v in wall.items()}
  ref = "plain, tuned malloc"
  rows = {
    k: {
      "steps_per_s": float(1.0 / np.median(w[k])),
      "cpu_s_per_step": float(np.median(cpu[k])),
      "minor_faults_per_step": int(np.median(faults[k])),
      "speedup_vs_plain": float(np.median(w[ref] / w[k])),
      "wall_s": w[k].tolist(),
    }
    for k in names
  }
  for k in names:
    for t in sorted({1, n}):
      rows[k][f"ratio_vs_torch{t}t"] = float(np.median(w[f"torch{t}t, tuned malloc"] / w[k]))
  return {"jax_compile_s": compile_s, "rows": rows}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--resolutions", default="28x28x1,32x32x3", help="comma-separated HxWxC")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--quick", action="store_true", help="8x8x1, batch 8, 2 rounds: a smoke run")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = ap.parse_args()
  if args.quick:
    args.resolutions, args.batch, args.rounds = "8x8x1", 8, 2
  torch.set_num_threads(os.cpu_count())
  keep_freed_memory()
  t_start, load_start = time.time(), os.getloadavg()
  result = {
    "command": ("python experiments/bench_cpu_paths.py " + " ".join(sys.argv[1:])).strip(),
    "batch": args.batch,
    "rounds": args.rounds,
    "cpu_count": os.cpu_count(),
    "load_avg_start": load_start,
    "variants": VARIANTS,
    "resolutions": {},
  }
  for res in args.resolutions.split(","):
    result["resolutions"][res] = bench_resolution(res, args.batch, args.rounds)
  result["load_avg_end"] = os.getloadavg()
  result["wall_s"] = time.time() - t_start
  os.makedirs(args.out, exist_ok=True)
  name = os.path.join(args.out, "bench_cpu_paths" + ("_quick" if args.quick else ""))
  with open(name + ".json", "w") as f:
    json.dump(result, f, indent=1)
  n = os.cpu_count()
  lines = [
    "# bench_cpu_paths: what each CPU fast path buys on the U-Net training step",
    "",
    (
      f"`{result['command']}`: batch {args.batch}, {args.rounds} rounds alternating every row in one "
      f"process per resolution; {n} CPU cores shared with other jobs (load average {load_start[0]:.1f} at "
      f"start, {result['load_avg_end'][0]:.1f} at end); {result['wall_s'] / 60:.1f} min. Speed-ups are "
      "medians over rounds of per-round time ratios, so load hits both sides of a ratio alike; absolute "
      "steps/s are inflated by the load. CPU s/step and page faults are this process's (all threads). "
      "`+groupnorm` = both fast paths (what `\"auto\"` selects on CPU)."
    ),
  ]
  for res, r in result["resolutions"].items():
    lines += [
      "",
      f"## {res}",
      "",
      (
        f"| configuration | steps/s | speed-up vs plain | vs torch1t | vs torch{n}t | CPU s/step | "
        "minor page faults/step |"
      ),
      "|---|---|---|---|---|---|---|",
    ]
    for k, row in r["rows"].items():
      lines.append(
        f"| {k} | {row['steps_per_s']:.3f} | {row['speedup_vs_plain']:.2f}x | {row['ratio_vs_torch1t']:.2f}x | "
        f"{row[f'ratio_vs_torch{n}t']:.2f}x | {row['cpu_s_per_step']:.2f} | {row['minor_faults_per_step']:,} |"
      )
  with open(name + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
