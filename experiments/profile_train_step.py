"""Where the U-Net training step spends its time: diffjax (XLA:CPU) and PyTorch, op class by op class.

The network and step are ``bench_unet.py``'s (diffusers ``UNet2DModel`` layout, channels (32, 64), two
ResNets per level, attention on level 2, batch 64, AdamW + clipping + EMA, same weights on both sides).
For each resolution it profiles a few steps of each framework after warm-up:

* diffjax: ``jax.profiler.trace`` (Perfetto JSON). Each top-level thunk of the compiled step is mapped to
  its HLO instruction (``compiled.as_text()``) and classed by what it computes (diffjax's native CPU
  kernels, :mod:`diffjax.cpu_kernels`, by their custom-call target): convolution forward,
  convolution input gradient, convolution weight gradient (XLA writes it as a convolution whose window
  is the whole feature map), the attention core (the blocked loop of :mod:`diffjax.models.attention_kernels`),
  GroupNorm, dense layers, layout copies (transposes) and the rest (elementwise, optimizer, EMA).
* PyTorch: ``torch.profiler`` self CPU time per aten op (``set_num_threads`` to the core count), classed
  the same way; ``aten::convolution_backward`` holds both convolution gradients.

Per class it reports ms per step on each side and their ratio, so the class that costs diffjax most
relative to PyTorch is the one to attack next (issue: train steps/s vs PyTorch). Times are wall time of
each op on the calling thread (ops run one after another on both sides; each uses the intra-op threads).
Absolute times depend on the machine's load; run it on a quiet machine. diffjax runs with its defaults
(native CPU kernels; ``DIFFJAX_CPU_KERNELS=xla`` profiles XLA's kernels instead, then with
``DIFFJAX_CPU_CONV=xla`` for attributable convolutions, see :mod:`diffjax.xla_cpu`).

With ``--sample`` it profiles guided DDIM sampling instead (``bench_unet.py``'s samplers: classifier-free
guidance with both passes in one batch of 2 x ``--sample-batch`` images, ``--steps`` DDIM steps per
run), in ms per sampling step, i.e. per model evaluation. The whole diffjax sampler is one loop (one
``while`` thunk), so every thunk but that loop is counted; with ``DIFFJAX_CPU_KERNELS=xla`` the ops
inside the blocked-attention loops are then classed as dense/other rather than "attention core".

Run:   python experiments/profile_train_step.py   (28x28x1 and 32x32x3, ~3 min)
       python experiments/profile_train_step.py --sample   (-> profile_sampling.*, ~2 min)
       python experiments/profile_train_step.py --res 8x8x1 --steps 2 --name profile_quick
Writes experiments/results/profile_train_step.json and .md (``profile_sampling.*`` with ``--sample``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import TorchTrainer, make_jax_sampler, make_torch_sampler, new_state, setup
from trained_run import machine, write_results

from diffjax import cpu_kernels
from diffjax.xla_cpu import cpu_conv_library

CLASSES = (
  "conv forward",
  "conv input grad",
  "conv weight grad",
  "conv grads (torch: both)",
  "attention core",
  "group norm",
  "dense",
  "layout copies",
  "other",
  "not attributed",
)
UNATTRIBUTED_NOTE = (
  "`not attributed` is the traced steps' wall time minus the ops above: dispatch gaps and, with XLA's "
  "XNNPACK convolutions (`DIFFJAX_CPU_KERNELS=xla`), the convolutions themselves, whose thunks return "
  "before the library finishes and so carry almost none of their time"
)


def hlo_instructions(hlo_text: str) -> dict[str, str]:
  """Every instruction's name -> its HLO line with metadata (entry, loop bodies and fusions alike)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
    if m:
      out[m.group(1)] = line
  return out


def fused_bodies(hlo_text: str) -> dict[str, str]:
  """Computation name -> the text of its body (to see what a fusion computes)."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    m = re.match(r"%(\S+) \(", line)
    if m:
      name, lines = m.group(1), []
    elif name is not None:
      lines.append(line)
      if line.startswith("}"):
        bodies[name], name = "\n".join(lines), None
  return bodies


def jax_class(name: str, line: str, bodies: dict[str, str]) -> str:
  op = re.search(r'op_name="([^"]*)"', line)
  op = op.group(1) if op else ""
  called = re.search(r"calls=%([^,\s]+)", line)
  body = bodies.get(called.group(1), "") if called else line  # unfused ops (e.g. XNNPACK convolutions)
  if name.startswith("while") and ("attend" in op or "attention" in op):
    return "attention core"
  native = re.search(r'custom_call_target="Diffjax(\w+)"', line)  # diffjax.cpu_kernels
  if native:
    kernel = native.group(1)
    if kernel.startswith("WinogradConv"):  # forward, or the input gradient (a convolution of dy)
      return "conv input grad" if "transpose(" in op else "conv forward"
    if kernel == "WinogradWeights":  # the kernel transform (hoisted out of sampling loops)
      return "conv input grad" if "transpose(" in op else "conv forward"
    if kernel == "Dense":  # rank-4 result: a 1x1 convolution's forward (PyTorch counts those as convs)
      return "conv forward" if re.search(r"= f32\[\d+,\d+,\d+,\d+\]", line) else "dense"
    if kernel.startswith("OnednnConv"):
      return {"OnednnConvFwd": "conv forward", "OnednnConvBwdData": "conv input grad"}.get(
        kernel, "conv weight grad"
      )
    return "attention core" if kernel.startswith("Attention") else "group norm"
  conv = re.search(r"convolution\(.*window=\{size=(\d+)x(\d+)", body)
  if conv:
    if int(conv.group(1)) * int(conv.group(2)) > 9:  # window = the whole map: d(loss)/d(kernel)
      return "conv weight grad"
    return "conv input grad" if "transpose(" in op else "conv forward"
  if "norm" in op:
    return "group norm"
  if " dot(" in body or "dot_general" in op:
    return "dense"
  if name.startswith(("transpose", "copy")):
    return "layout copies"
  return "other"


def _jax_events(trace) -> list:
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def _traced(fn, steps: int) -> tuple[list, float]:
  """Runs ``fn`` once under ``jax.profiler.trace``: its complete events and wall ms per step."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      fn()
      traced_ms = (time.perf_counter() - t0) / steps * 1e3
    (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      return _jax_events(json.load(f)), traced_ms


def profile_jax(p, steps: int) -> dict:
  state, key = new_state(p), jax.random.key(2)
  compiled = p["step"].lower(state, p["batch"], key).compile()
  text = compiled.as_text()
  lines, bodies = hlo_instructions(text), fused_bodies(text)
  for _ in range(8):  # warm-up until the single malloc heap has settled (no page faults in the steps)
    state, m = compiled(state, p["batch"], key)
  jax.block_until_ready(m)
  plain = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, p["batch"], key)
    jax.block_until_ready(m)
    plain.append(time.perf_counter() - t0)
  holder = {"state": state}

  def run():
    for _ in range(steps):
      holder["state"], m = compiled(holder["state"], p["batch"], key)
    jax.block_until_ready(m)

  events, traced_ms = _traced(run, steps)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("name") in lines:  # thunks of the step's top-level instructions
      total[e["name"]] += e.get("dur", 0.0)
      count[e["name"]] += 1
  by_class = collections.Counter()
  for name, us in total.items():
    if count[name] > steps:  # runs inside a loop body: already inside its loop's time
      continue
    by_class[jax_class(name, lines[name], bodies)] += us / steps / 1e3
  by_class["not attributed"] = max(0.0, traced_ms - sum(by_class.values()))
  return {"ms": dict(by_class), "plain_step_ms": float(np.median(plain)) * 1e3}


def profile_jax_sampling(p, steps: int, guidance: float) -> dict:
  args = (p["params"], jax.numpy.asarray(p["x_T"]), jax.numpy.asarray(p["s_labels"]))
  n = jax.numpy.int32(steps)
  compiled = make_jax_sampler(p["model"], p["schedule"], guidance).lower(*args, n).compile()
  text = compiled.as_text()
  lines, bodies = hlo_instructions(text), fused_bodies(text)
  jax.block_until_ready(compiled(*args, n))
  plain = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args, n))
    plain.append((time.perf_counter() - t0) / steps)
  events, traced_ms = _traced(lambda: jax.block_until_ready(compiled(*args, n)), steps)
  by_class = collections.Counter()
  for e in events:
    name = e.get("name")
    if name in lines and not name.startswith("while"):  # the sampler's loop holds all the rest
      by_class[jax_class(name, lines[name], bodies)] += e.get("dur", 0.0) / steps / 1e3
  by_class["not attributed"] = max(0.0, traced_ms - sum(by_class.values()))
  return {"ms": dict(by_class), "plain_step_ms": float(np.median(plain)) * 1e3}


def profile_torch_sampling(p, steps: int, guidance: float) -> dict:
  torch.set_num_threads(os.cpu_count())
  sample = make_torch_sampler(p["torch_model"], steps, guidance)
  sample(*p["t_sample_in"])
  plain = []
  for _ in range(3):
    t0 = time.perf_counter()
    sample(*p["t_sample_in"])
    plain.append((time.perf_counter() - t0) / steps)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    sample(*p["t_sample_in"])
    traced_ms = (time.perf_counter() - t0) / steps * 1e3
  return _torch_result(prof, steps, traced_ms, plain)


def _torch_result(prof, steps: int, traced_ms: float, plain: list) -> dict:
  """Self CPU ms per step by op class from a ``torch.profiler`` run of ``steps`` steps."""
  by_class = collections.Counter()
  for ev in prof.key_averages():
    by_class[torch_class(ev.key)] += ev.self_cpu_time_total / steps / 1e3
  by_class["not attributed"] = max(0.0, traced_ms - sum(by_class.values()))
  return {"ms": dict(by_class), "plain_step_ms": float(np.median(plain)) * 1e3}


def torch_class(name: str) -> str | None:
  n = name.lower()
  if n in ("aten::convolution_backward",):
    return "conv grads (torch: both)"
  if "convolution" in n:
    return "conv forward"
  if "group_norm" in n:
    return "group norm"
  if any(k in n for k in ("softmax", "bmm", "baddbmm", "scaled_dot_product", "_flash_attention")):
    return "attention core"
  if any(k in n for k in ("addmm", "aten::mm", "aten::linear", "aten::matmul")):
    return "dense"
  if any(k in n for k in ("copy_", "contiguous", "clone", "aten::t", "transpose", "permute")):
    return "layout copies"
  return "other"


def profile_torch(p, steps: int) -> dict:
  torch.set_num_threads(os.cpu_count())
  trainer = TorchTrainer(p["torch_model"], np.asarray(p["schedule"].alphas_cumprod))
  for _ in range(4):
    trainer.step(*p["t_batch"])
  plain = []
  for _ in range(steps):
    t0 = time.perf_counter()
    trainer.step(*p["t_batch"])
    plain.append(time.perf_counter() - t0)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      trainer.step(*p["t_batch"])
    traced_ms = (time.perf_counter() - t0) / steps * 1e3
  return _torch_result(prof, steps, traced_ms, plain)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--res", nargs="+", default=["28x28x1", "32x32x3"])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument(
    "--steps", type=int, default=None, help="profiled steps per framework (3; 10 DDIM steps with --sample)"
  )
  ap.add_argument("--name", default=None, help="results name (default profile_train_step / profile_sampling)")
  ap.add_argument("--sample", action="store_true", help="profile guided DDIM sampling instead of training")
  ap.add_argument("--sample-batch", type=int, default=8, help="images per sampling run (model batch 2x)")
  ap.add_argument("--guidance", type=float, default=2.0)
  a = ap.parse_args()
  a.name = a.name or ("profile_sampling" if a.sample else "profile_train_step")
  if a.steps is None:
    a.steps = 10 if a.sample else 3
  for res in a.res:
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*x[1-9]\d*", res):
      ap.error(f"--res: expected HxWxC with positive integers (e.g. 28x28x1), got {res!r}")
  if a.steps < 1:
    ap.error(f"--steps: expected a positive number of profiled steps, got {a.steps}")
  if a.batch < 1:
    ap.error(f"--batch: expected a positive batch size, got {a.batch}")
  if a.sample_batch < 1:
    ap.error(f"--sample-batch: expected a positive number of images, got {a.sample_batch}")
  t_start, load0 = time.perf_counter(), os.getloadavg()[0]
  rows = {}
  for res in a.res:
    if a.sample:
      p = setup(res, 8, a.sample_batch)
      rows[res] = {
        "jax": profile_jax_sampling(p, a.steps, a.guidance),
        "torch": profile_torch_sampling(p, a.steps, a.guidance),
      }
    else:
      p = setup(res, a.batch, 16)
      rows[res] = {"jax": profile_jax(p, a.steps), "torch": profile_torch(p, a.steps)}
    print(res, json.dumps(rows[res]), flush=True)
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "versions": {"jax": jax.__version__, "torch": torch.__version__},
    "diffjax_cpu_conv": cpu_conv_library(),
    "diffjax_cpu_kernels": "native" if cpu_kernels.enabled() else "xla",
    "load_average_start_end": [load0, os.getloadavg()[0]],
    "kind": "sampling" if a.sample else "training",
    "batch": 2 * a.sample_batch if a.sample else a.batch,
    "guidance": a.guidance if a.sample else None,
    "steps": a.steps,
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  what = (
    f"DDIM sampling with classifier-free guidance (w = {a.guidance}), model batch {2 * a.sample_batch}, "
    f"{a.steps} DDIM steps profiled per side after warm-up; ms per sampling step (one guided model evaluation)"
    if a.sample
    else f"batch {a.batch}, {a.steps} profiled steps per side after warm-up"
  )
  lines = [
    f"# {a.name}: U-Net {'guided DDIM sampling' if a.sample else 'training step'} by op class, diffjax vs PyTorch\n",
    f"`{result['command']}` on {result['machine']}; jax {jax.__version__}, torch {torch.__version__}; "
    f"diffjax CPU kernels: {result['diffjax_cpu_kernels']} (`DIFFJAX_CPU_KERNELS`), XLA convolutions: "
    f"{cpu_conv_library()} (`DIFFJAX_CPU_CONV`; {UNATTRIBUTED_NOTE}); "
    f"{what}; load average "
    f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (PyTorch's threads slow down badly when other "
    "jobs hold the cores). ms per step of op wall time under the profilers (which add overhead: compare a "
    "column's sum with its step time without a profiler, below each table). PyTorch's `convolution_backward` "
    "computes both convolution gradients; compare it with the sum of diffjax's two gradient rows.\n",
  ]
  for res, r in rows.items():
    j, t = r["jax"]["ms"], r["torch"]["ms"]
    lines += [
      f"## {res}\n",
      "| op class | diffjax ms | PyTorch ms | diffjax / PyTorch |",
      "|---|---|---|---|",
    ]
    for c in CLASSES:
      if c not in j and c not in t:
        continue
      jv, tv = j.get(c, 0.0), t.get(c, 0.0)
      ratio = f"{jv / tv:.2f}" if tv > 0 and jv > 0 else "-"
      lines.append(f"| {c} | {jv:.1f} | {tv:.1f} | {ratio} |")
    jg = sum(j.get(c, 0.0) for c in ("conv input grad", "conv weight grad"))
    tg = t.get("conv grads (torch: both)", 0.0)
    if tg:
      lines.append(f"| conv grads, both | {jg:.1f} | {tg:.1f} | {jg / tg:.2f} |")
    js, ts = sum(j.values()), sum(t.values())
    lines.append(f"| **sum** | **{js:.1f}** | **{ts:.1f}** | **{js / ts:.2f}** |")
    lines.append(
      f"\nStep time without a profiler (median of {a.steps}): diffjax {r['jax']['plain_step_ms']:.0f} ms, "
      f"PyTorch {r['torch']['plain_step_ms']:.0f} ms.\n"
    )
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
