"""diffjax U-Net vs diffusers' UNet2DModel (PyTorch) on this machine: training and guided DDIM sampling.

Both sides are the same network (diffusers ``UNet2DModel``, channels (32, 64), two ResNets per level,
attention on level 2 with heads of 8 channels, GroupNorm(8), class embedding with a null class) with
the same weights (:func:`diffjax.models.diffusers_names.diffusers_to_flax_params`); forward outputs and
sampled images are compared. Per resolution (8x8x1, 28x28x1, 32x32x3), alternating the frameworks in
one process after warm-up, it measures:

* training steps/s at batch 64 (eps MSE, AdamW, clipping, EMA, condition dropout on both sides;
  diffjax's ``make_train_step`` compiled by ``compile_train_step``: donated state, no host sync);
* DDIM-50 sampling with classifier-free guidance (w = 2, both passes in one batch), images/s, against
  diffusers' ``DDIMScheduler`` loop under ``torch.inference_mode`` (x0 clipping off on both sides);
* diffjax compile times, XLA's FLOP count of the train step and the model FLOP utilisation against
  this machine's measured f32 matmul peak; resident memory of each side (child processes);
* the input pipeline (:class:`diffjax.data.Prefetcher`) alone, and the train step fed by it.

PyTorch runs with ``torch.set_num_threads(os.cpu_count())`` (the headline ratio) and, in the same
rounds, with one thread as a reference. Ratios are medians over rounds (rotating the order of the
runs) of torch time / jax time, so load from other processes hits both sides of a round alike.

diffjax runs with its defaults, which on the CPU backend select the fast paths (blocked attention and
fused GroupNorm(+SiLU), both with hand-written VJPs; see ``bench_cpu_paths.py`` for what each buys).
The whole process, both frameworks alike, runs with glibc's malloc set as ``python -m diffjax`` sets
it: one heap for all threads, no mmapped chunks, freed memory kept for reuse
(:func:`diffjax.host_memory.reexec_with_tuned_malloc` restarts the script with ``GLIBC_TUNABLES``;
``--default-malloc`` keeps glibc's defaults for the comparison).

Run:   python experiments/bench_unet.py            (~15 min on 2 quiet CPU cores)
       python experiments/bench_unet.py --quick    (8x8x1 at batch 8, no memory children: a smoke run)
Writes experiments/results/bench_unet.json and .md (``bench_unet_quick.*`` with --quick); the .md
ends with the table for the README.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffjax.host_memory import keep_freed_memory, reexec_with_tuned_malloc

if "--default-malloc" not in sys.argv and "--child" not in sys.argv:
  reexec_with_tuned_malloc()  # restarts this process with GLIBC_TUNABLES set, before torch/jax start threads

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffjax import cpu_kernels, parallel
from diffjax.data import ImageDataset, Prefetcher
from diffjax.guidance import classifier_free_guidance
from diffjax.models import UNet, count_params
from diffjax.models.attention import resolve_attention_fn
from diffjax.models.diffusers_names import diffusers_to_flax_params
from diffjax.models.group_norm import resolve_norm_impl
from diffjax.samplers import ddim_sample
from diffjax.schedules import make_schedule
from diffjax.training.state import create_train_state, make_optimizer
from diffjax.training.step import compile_train_step, make_model_fn, make_train_step

ARCH = {"block_out_channels": (32, 64), "layers_per_block": 2, "attention_head_dim": 8, "norm_num_groups": 8}
NUM_CLASSES, T = 10, 1000
LR, CLIP, EMA, DROP = 1e-4, 1.0, 0.999, 0.1


class TorchTrainer:
  """The same step as diffjax's ``make_train_step``: condition dropout, eps loss, clip, AdamW, EMA."""

  def __init__(self, model, alphas_cumprod: np.ndarray):
    self.model = copy.deepcopy(model).train()  # the sampler keeps the original weights
    self.params = list(self.model.parameters())
    self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    self.ema = [p.detach().clone() for p in self.params]
    self.ab, self.count = torch.tensor(alphas_cumprod, dtype=torch.float32), 0

  def step(self, x0, labels):
    b = x0.shape[0]
    t, noise = torch.randint(0, T, (b,)), torch.randn_like(x0)
    y = torch.where(torch.rand(b) < DROP, torch.full_like(labels, NUM_CLASSES), labels)
    a = self.ab[t].view(b, 1, 1, 1)
    loss = torch.nn.functional.mse_loss(
      self.model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=y).sample, noise
    )
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, CLIP)
    self.opt.step()
    with torch.no_grad():
      d = min(EMA, (1 + self.count) / (10 + self.count))
      torch._foreach_lerp_(self.ema, self.params, 1 - d)
    self.count += 1


def make_torch_sampler(model, num_steps: int, guidance: float):
  """diffusers' DDIM loop with batched classifier-free guidance: ``sample(x_T, labels, steps)``."""
  sched = diffusers.DDIMScheduler(
    num_train_timesteps=T,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="leading",
  )
  model = model.eval()

  @torch.inference_mode()
  def sample(x_T, labels, steps: int = num_steps):
    sched.set_timesteps(num_steps)
    x, y = x_T, torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
    for t in sched.timesteps[:steps]:
      c, u = model(torch.cat([x, x]), t, class_labels=y).sample.chunk(2)
      x = sched.step(u + guidance * (c - u), t, x, eta=0.0).prev_sample
    return x

  return sample


def make_jax_sampler(model: UNet, schedule, guidance: float):
  """Jitted ``sample(params, x_T, labels, num_steps)``: DDIM with CFG in one batch; steps are traced."""

  def sample(params, x_T, labels, num_steps):
    null = jnp.full_like(labels, NUM_CLASSES)
    guided = classifier_free_guidance(make_model_fn(model), guidance_scale=guidance, null_cond=null)
    return ddim_sample(
      model_fn=guided, params=params, schedule=schedule, x_T=x_T, key=jax.random.key(0), cond=labels,
      num_steps=num_steps, eta=0.0, clip_x0=None,
    )  # fmt: skip

  return jax.jit(sample)


def setup(res: str, batch: int, sample_batch: int) -> dict:
  """Both models with equal weights, the compiled-step factory and the inputs of both sides."""
  h, w, c = (int(v) for v in res.split("x"))
  torch.manual_seed(0)
  tm = diffusers.UNet2DModel(
    sample_size=h, in_channels=c, out_channels=c, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1, **ARCH,
  )  # fmt: skip
  model = UNet(in_channels=c, out_channels=c, attention_levels=(False, True), num_classes=NUM_CLASSES, **ARCH)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, c)), jnp.zeros((1,)))["params"]
  params = jax.tree.map(jnp.asarray, diffusers_to_flax_params(tm.state_dict(), template=shapes))
  p = {"res": (h, w, c), "torch_model": tm, "model": model, "params": params, "mesh": parallel.make_mesh(1)}
  p["schedule"], p["tx"] = (
    make_schedule("linear", num_timesteps=T),
    make_optimizer(learning_rate=LR, grad_clip=CLIP),
  )
  train_step = make_train_step(
    model=model, schedule=p["schedule"], tx=p["tx"], cond_drop_prob=DROP, ema_decay=EMA
  )
  p["step"] = compile_train_step(train_step, p["mesh"])
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  p["batch"] = parallel.to_global({"image": images, "label": labels}, p["mesh"])
  p["t_batch"] = (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels).long())
  p["x_T"] = np.asarray(jax.random.normal(jax.random.key(1), (sample_batch, h, w, c)))
  p["s_labels"] = rng.integers(0, NUM_CLASSES, sample_batch).astype(np.int32)
  p["t_sample_in"] = (
    torch.from_numpy(p["x_T"].transpose(0, 3, 1, 2).copy()),
    torch.from_numpy(p["s_labels"]).long(),
  )
  return p


def new_state(p):
  return create_train_state(params=jax.tree.map(jnp.copy, p["params"]), tx=p["tx"])  # donated later


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def with_threads(fn, n: int):
  """``fn`` run under ``torch.set_num_threads(n)``, back to the core count afterwards."""
  return lambda: (torch.set_num_threads(n), fn(), torch.set_num_threads(os.cpu_count()))


def alternate(runs: dict, rounds: int, per_call: int, per_s: float, unit: str) -> dict:
  """Times every run once per round (rotating the order); rates and per-round torch/jax ratios."""
  names, t = list(runs), {k: [] for k in runs}
  for r in range(rounds):
    for k in names[r % len(names) :] + names[: r % len(names)]:
      t[k].append(timed(runs[k]) / per_call)
  t = {k: np.array(v) for k, v in t.items()}
  out = {f"{k}_s": v.tolist() for k, v in t.items()}
  out.update({f"{k}_{unit}": float(per_s / np.median(v)) for k, v in t.items()})
  out.update({f"ratio_vs_{k}": float(np.median(v / t["jax"])) for k, v in t.items() if k != "jax"})
  out["ratio"] = out["ratio_vs_torch"]
  return out


def forward_parity(p) -> float:
  x, t, y = p["x_T"][:2], np.array([10, 700]), np.array([1, NUM_CLASSES])
  with torch.no_grad():
    ref = p["torch_model"].eval()(
      torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), class_labels=torch.from_numpy(y)
    )
  ours = jax.jit(p["model"].apply)({"params": p["params"]}, x, t, y)
  return float(np.max(np.abs(np.asarray(ours) - ref.sample.numpy().transpose(0, 2, 3, 1))))


@contextlib.contextmanager
def xla_kernels():
  """Traces inside use XLA's kernels instead of diffjax's native CPU kernels (diffjax.cpu_kernels)."""
  old = os.environ.get(cpu_kernels.ENV_VAR)
  os.environ[cpu_kernels.ENV_VAR] = "xla"
  jax.clear_caches()  # the setting is read when tracing: trace again
  try:
    yield
  finally:
    os.environ.pop(cpu_kernels.ENV_VAR) if old is None else os.environ.update({cpu_kernels.ENV_VAR: old})
    jax.clear_caches()


def bench_train(p, rounds: int, steps: int, ref_threads: int, warmup: int) -> tuple[dict, dict]:
  holder, key = {"state": new_state(p)}, jax.random.key(2)
  t0 = time.perf_counter()
  compiled = p["step"].lower(holder["state"], p["batch"], key).compile()
  compile_s = time.perf_counter() - t0
  xla_holder = {"state": new_state(p)}
  with xla_kernels():
    compiled_xla = p["step"].lower(xla_holder["state"], p["batch"], key).compile()
  # FLOPs from XLA's cost analysis of the XLA-kernel step: custom calls (diffjax's native kernels) have
  # no FLOP count, and both executables compute the same model.
  cost = compiled_xla.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  trainer = TorchTrainer(p["torch_model"], np.asarray(p["schedule"].alphas_cumprod))

  def stepper(step, state_holder):
    def run():
      s = state_holder["state"]
      for _ in range(steps):
        s, m = step(s, p["batch"], key)
      jax.block_until_ready(m)
      state_holder["state"] = s

    return run

  jax_steps, jax_xla_steps = stepper(compiled, holder), stepper(compiled_xla, xla_holder)

  def torch_steps():
    for _ in range(steps):
      trainer.step(*p["t_batch"])

  runs = {"jax": jax_steps, "torch": torch_steps}
  if cpu_kernels.enabled():
    runs["jax_xla"] = jax_xla_steps
  if ref_threads:
    runs["torch_ref"] = with_threads(torch_steps, ref_threads)
  for _ in range(warmup):  # until the heap has settled: no page faults in the timed steps
    for fn in runs.values():
      fn()
  out = alternate(runs, rounds, steps, 1.0, "steps_per_s")
  out.update(jax_compile_s=compile_s, flops_per_step=float(cost["flops"]))
  out["xla_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return out, {"compiled": compiled, "holder": holder}


def bench_pipeline(p, jx: dict, steps: int) -> dict:
  """The Prefetcher alone, and the compiled step fed by it vs on the fixed device-resident batch."""
  rng, b = np.random.default_rng(1), p["batch"]["image"].shape[0]
  images = rng.integers(0, 256, (4096, *p["res"]), dtype=np.uint8)
  ds = ImageDataset(images, rng.integers(0, NUM_CLASSES, 4096).astype(np.int32), NUM_CLASSES, "synthetic")
  batches = lambda n: Prefetcher(ds, start_step=0, seed=0, global_batch_size=b, num_steps=n)
  with batches(50) as it:
    t_pipe = timed(lambda: [None for _ in it]) / 50
  compiled, key = jx["compiled"], jax.random.key(2)

  def loop(fed: bool):
    s = jx["holder"]["state"]
    with batches(steps) as it:
      for _, local in it:
        s, m = compiled(s, parallel.to_global(local, p["mesh"]) if fed else p["batch"], key)
    jax.block_until_ready(m)
    jx["holder"]["state"] = s

  t_fixed = min(timed(lambda: loop(False)) for _ in range(2)) / steps
  t_fed = min(timed(lambda: loop(True)) for _ in range(2)) / steps
  return {"batches_per_s": 1 / t_pipe, "fixed_steps_per_s": 1 / t_fixed, "fed_steps_per_s": 1 / t_fed}


def bench_sampling(p, rounds: int, num_steps: int, guidance: float, ref_threads: int) -> dict:
  args = (p["params"], jnp.asarray(p["x_T"]), jnp.asarray(p["s_labels"]))
  t0 = time.perf_counter()
  compiled = make_jax_sampler(p["model"], p["schedule"], guidance).lower(*args, jnp.int32(1)).compile()
  compile_s = time.perf_counter() - t0
  with xla_kernels():
    compiled_xla = make_jax_sampler(p["model"], p["schedule"], guidance).lower(*args, jnp.int32(1)).compile()
  jax.block_until_ready(compiled_xla(*args, jnp.int32(1)))
  tsample = make_torch_sampler(p["torch_model"], num_steps, guidance)
  jax.block_until_ready(compiled(*args, jnp.int32(1)))  # warm-up (same executable: steps are traced)
  tsample(*p["t_sample_in"], steps=1)
  out = {}

  def jax_run():
    out["jax"] = np.asarray(jax.block_until_ready(compiled(*args, jnp.int32(num_steps))))

  def jax_xla_run():
    out["jax_xla"] = np.asarray(jax.block_until_ready(compiled_xla(*args, jnp.int32(num_steps))))

  def torch_run():
    out["torch"] = tsample(*p["t_sample_in"]).numpy().transpose(0, 2, 3, 1)

  runs = {"jax": jax_run, "torch": torch_run}
  if cpu_kernels.enabled():
    runs["jax_xla"] = jax_xla_run
  if ref_threads:
    runs["torch_ref"] = with_threads(torch_run, ref_threads)
  res = alternate(runs, rounds, 1, p["x_T"].shape[0], "images_per_s")
  res.update(jax_compile_s=compile_s, max_abs_diff_vs_torch=float(np.max(np.abs(out["jax"] - out["torch"]))))
  return res


def matmul_peak(n: int, reps: int) -> dict:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  mm, ta = jax.jit(lambda a: a @ a), torch.from_numpy(np.asarray(a))
  jax.block_until_ready(mm(a))
  tj = min(timed(lambda: jax.block_until_ready(mm(a))) for _ in range(reps))
  tt = min(timed(lambda: torch.mm(ta, ta)) for _ in range(reps))
  fl = 2.0 * n**3 / 1e9
  return {"n": n, "jax_gflops": fl / tj, "torch_gflops": fl / tt, "peak_gflops": max(fl / tj, fl / tt)}


def rss_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def child_memory(framework: str, kind: str, res: str, batch: int, sample_batch: int) -> dict:
  """RSS in a fresh process (both frameworks imported; jax executables from the compilation cache), in
  MB over the RSS after the imports: peak while building the models and (jax) tracing and loading the
  executable, ready to run, and peak increase over ready while running 2 train steps or 2 guided DDIM
  steps (model batch 2 x sample_batch) of one side (the first run allocates optimiser state and buffers)."""
  base = rss_mb("VmRSS:")
  p = setup(res, batch, sample_batch)
  if framework == "jax" and kind == "train":
    holder, key = {"s": new_state(p)}, jax.random.key(2)
    fn = p["step"].lower(holder["s"], p["batch"], key).compile()

    def run():
      holder["s"], m = fn(holder["s"], p["batch"], key)
      jax.block_until_ready(m)
  elif framework == "jax":
    args = (p["params"], jnp.asarray(p["x_T"]), jnp.asarray(p["s_labels"]), jnp.int32(1))
    sample = make_jax_sampler(p["model"], p["schedule"], 2.0).lower(*args).compile()
    run = lambda: jax.block_until_ready(sample(*args))
  elif kind == "train":
    trainer = TorchTrainer(p["torch_model"], np.asarray(p["schedule"].alphas_cumprod))
    run = lambda: trainer.step(*p["t_batch"])
  else:
    tsample = make_torch_sampler(p["torch_model"], 50, 2.0)
    run = lambda: tsample(*p["t_sample_in"], steps=1)
  ready, build_peak = rss_mb("VmRSS:"), rss_mb("VmHWM:")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak-RSS counter VmHWM
  run()
  run()
  peak = rss_mb("VmHWM:")
  return {
    "build_mb": build_peak - base,
    "ready_mb": ready - base,
    "run_mb": peak - ready,
    "peak_mb": peak - base,
  }


def memory_children(args, res: str, env: dict) -> dict:
  out = {}
  for name in ("jax:train", "torch:train", "jax:sample", "torch:sample"):
    cmd = [sys.executable, __file__, "--child", f"{name}:{res}", "--batch", str(args.batch)]
    cmd += ["--sample-batch", str(args.sample_batch)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out[name.replace(":", "_")] = json.loads(lines[-1]) if lines else {"error": r.stderr[-800:]}
  return out


def targets_met(result: dict, key: str = "ratio") -> dict:
  """The issue's targets: train >= 1.5x at 28x28x1 and 32x32x3, >= 1.0x at 8x8x1; sampling >= 2x."""
  out = {}
  for res, r in result["resolutions"].items():
    need = 1.0 if res.startswith("8x8") else 1.5
    if key in r["train"]:
      out[f"train {res} >= {need}x"] = bool(r["train"][key] >= need)
      out[f"sampling {res} >= 2x"] = bool(r["sampling"][key] >= 2.0)
  return out


def write_markdown(result: dict) -> str:
  m, st, v, mach = result["matmul"], result["settings"], result["versions"], result["machine"]
  n, arch = st["torch_ref_threads"], st["arch"]
  rf = lambda d, k: f"{d[k]:.2f}" if k in d else "-"
  header = (
    f"`{result['command']}`: jax {v['jax']}, torch {v['torch']}, diffusers {v['diffusers']}; "
    f"{mach['cpu_count']} CPU cores shared with other jobs (load average {mach['load_avg_start'][0]:.1f} at "
    f"start, {mach['load_avg_end'][0]:.1f} at end); {result['wall_s'] / 60:.1f} min. UNet2DModel channels "
    f"{tuple(arch['block_out_channels'])}, {arch['layers_per_block']} ResNets per level, attention on level 2 "
    f"(head dim {arch['attention_head_dim']}), GroupNorm({arch['norm_num_groups']}), {st['num_classes']} "
    f"classes + null, same weights on both sides. Training batch {st['batch']}; sampling DDIM-"
    f"{st['sample_steps']}, guidance {st['guidance']}, {st['sample_batch']} images per run (model batch "
    f"{2 * st['sample_batch']}). torch: `set_num_threads({st['torch_threads']})`, the core count (headline "
    f"ratio); torch{n}t: {n} thread, timed in the same rounds. Ratio: median over rounds (rotating the "
    "order of the runs) of torch time / jax time. jax: diffjax's native CPU kernels (oneDNN convolutions, "
    "GroupNorm; `diffjax.cpu_kernels`); jax-xla: the same diffjax model traced with "
    "`DIFFJAX_CPU_KERNELS=xla` (XLA's kernels, the previous default), timed in the same rounds. "
    f"Training: {st.get('train_warmup', 1)} untimed warm-up runs of each side, then {st['train_rounds']} rounds. "
    f"glibc malloc of the whole process (both frameworks): `GLIBC_TUNABLES={mach.get('glibc_tunables') or '(unset)'}`"
    + (" (`diffjax.host_memory`, as `python -m diffjax` runs)." if mach.get("glibc_tunables") else ".")
  )
  lines = [
    "# bench_unet: diffjax U-Net vs diffusers UNet2DModel (PyTorch), same machine, one run",
    "",
    header,
    "",
    (
      f"Matmul peak (f32 {m['n']}^3, best of 5): jax {m['jax_gflops']:.0f} GFLOP/s, torch "
      f"{m['torch_gflops']:.0f} GFLOP/s. MFU: XLA's FLOP count of the train step x steps/s / the higher peak."
    ),
    "",
    (
      f"| resolution | train steps/s jax / torch / torch{n}t | train ratio (vs torch{n}t) | MFU jax / torch | "
      f"DDIM-{st['sample_steps']} CFG images/s jax / torch / torch{n}t | sampling ratio (vs torch{n}t) | "
      "native kernels speed-up over jax-xla, train / sampling |"
    ),
    "|---|---|---|---|---|---|---|",
  ]
  for res, r in result["resolutions"].items():
    tr, sa = r["train"], r["sampling"]
    lines.append(
      f"| {res} | {tr['jax_steps_per_s']:.2f} / {tr['torch_steps_per_s']:.2f} / "
      f"{rf(tr, 'torch_ref_steps_per_s')} | **{tr['ratio']:.2f}x** ({rf(tr, 'ratio_vs_torch_ref')}x) | "
      f"{100 * tr['mfu_jax']:.1f}% / {100 * tr['mfu_torch']:.1f}% | {sa['jax_images_per_s']:.2f} / "
      f"{sa['torch_images_per_s']:.2f} / {rf(sa, 'torch_ref_images_per_s')} | **{sa['ratio']:.2f}x** "
      f"({rf(sa, 'ratio_vs_torch_ref')}x) | {rf(tr, 'ratio_vs_jax_xla')}x / {rf(sa, 'ratio_vs_jax_xla')}x |"
    )
  lines += [
    "",
    (
      "| resolution | params | GFLOP/train step | jax compile train / sampler (s) | max abs diff forward / "
      "samples | pipeline batches/s | steps/s fed by pipeline / fixed batch | RSS MB running (process peak) train "
      "jax / torch | sampling jax / torch |"
    ),
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for res, r in result["resolutions"].items():
    tr, sa, pl, mem = r["train"], r["sampling"], r["pipeline"], r.get("memory", {})
    mb = {k: f"{x['run_mb']:.0f} ({x['peak_mb']:.0f})" if "run_mb" in x else "-" for k, x in mem.items()}
    lines.append(
      f"| {res} | {r['params']:,} | {tr['flops_per_step'] / 1e9:.1f} | {tr['jax_compile_s']:.0f} / "
      f"{sa['jax_compile_s']:.0f} | {r['forward_max_abs_diff']:.1e} / {sa['max_abs_diff_vs_torch']:.1e} | "
      f"{pl['batches_per_s']:.0f} | {pl['fed_steps_per_s']:.2f} / {pl['fixed_steps_per_s']:.2f} | "
      f"{mb.get('jax_train', '-')} / {mb.get('torch_train', '-')} | {mb.get('jax_sample', '-')} / "
      f"{mb.get('torch_sample', '-')} |"
    )
  met = lambda t: ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in t.items())
  lines += [
    "",
    f"Targets against torch at the core count (the issue's definition): {met(result['targets'])}.",
  ]
  if result["targets_vs_torch_ref"]:
    lines += ["", f"The same targets against torch{n}t: {met(result['targets_vs_torch_ref'])}."]
  lines += ["", "## README table", "", *readme_table(result)]
  return "\n".join(lines) + "\n"


def readme_table(result: dict) -> list[str]:
  """The compact table for the README: diffjax vs PyTorch at the core count (and at the reference
  thread count, in brackets, when timed), with MFU."""
  st, mach = result["settings"], result["machine"]
  t, n = st["torch_threads"], st["torch_ref_threads"]
  ref = lambda d: f" ({d['ratio_vs_torch_ref']:.2f}x)" if "ratio_vs_torch_ref" in d else ""
  vs = f" (vs {n} thread{'s' if n > 1 else ''})" if n else ""
  rows = [
    (
      f"| resolution (batch {st['batch']}) | train steps/s diffjax / PyTorch ({t} threads) | train speed-up"
      f"{vs} | diffjax MFU | DDIM-{st['sample_steps']} CFG images/s diffjax / "
      f"diffusers | sampling speed-up{vs} |"
    ),
    "|---|---|---|---|---|---|",
  ]
  for res, r in result["resolutions"].items():
    tr, sa = r["train"], r["sampling"]
    rows.append(
      f"| {res} | {tr['jax_steps_per_s']:.2f} / {tr['torch_steps_per_s']:.2f} | {tr['ratio']:.2f}x{ref(tr)} | "
      f"{100 * tr['mfu_jax']:.0f}% | {sa['jax_images_per_s']:.2f} / {sa['torch_images_per_s']:.2f} | "
      f"{sa['ratio']:.2f}x{ref(sa)} |"
    )
  rows += [
    "",
    (
      f"{mach['cpu_count']} CPU cores, load average {mach['load_avg_start'][0]:.1f} at start; "
      f"matmul peak {result['matmul']['peak_gflops']:.0f} GFLOP/s; `{result['command'].strip()}`."
    ),
  ]
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--resolutions", default="8x8x1,28x28x1,32x32x3")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--sample-batch", type=int, default=8, help="images per DDIM run (model batch 2x)")
  ap.add_argument("--sample-steps", type=int, default=50)
  ap.add_argument("--guidance", type=float, default=2.0)
  ap.add_argument("--train-rounds", type=int, default=7)
  ap.add_argument("--train-steps", type=int, default=1, help="steps per run per round")
  ap.add_argument("--train-warmup", type=int, default=6, help="untimed runs of each side before the rounds")
  ap.add_argument("--sample-rounds", type=int, default=5)
  ap.add_argument("--torch-ref-threads", type=int, default=1, help="also time torch with N threads; 0: off")
  ap.add_argument("--no-memory", action="store_true")
  ap.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap/trim settings")
  ap.add_argument("--quick", action="store_true", help="tiny smoke run of the whole script")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.train_warmup < 0:
    ap.error(f"--train-warmup: expected a number of runs >= 0, got {args.train_warmup}")
  torch.set_num_threads(os.cpu_count())
  if args.child:
    fw, kind, res = args.child.split(":")
    torch.set_num_threads(1)  # memory does not depend on it, and a busy machine punishes 2 threads
    print(json.dumps(child_memory(fw, kind, res, args.batch, args.sample_batch)))
    return
  if not args.default_malloc:
    keep_freed_memory()  # before any large allocation; applies to both frameworks
  if args.quick:
    args.resolutions, args.batch, args.sample_batch, args.sample_steps = "8x8x1", 8, 2, 3
    args.train_rounds, args.train_steps, args.sample_rounds, args.no_memory = 2, 1, 2, True
    args.train_warmup = 1
  # Memory children load the compiled executables from this cache. glibc returns blocks >= 64 KiB
  # to the OS when they are freed, so both frameworks' RSS follows their live memory.
  cache = tempfile.mkdtemp(prefix="bench_unet_xla_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env["MALLOC_MMAP_THRESHOLD_"] = "65536"
  env.pop("GLIBC_TUNABLES", None)  # the children measure live memory, so freed memory goes back
  t_start = time.time()
  result = {
    "command": ("python experiments/bench_unet.py " + " ".join(sys.argv[1:])).strip(),
    "machine": {
      "cpu_count": os.cpu_count(),
      "load_avg_start": os.getloadavg(),
      "backend": jax.default_backend(),
      "malloc": "glibc default" if args.default_malloc else "keep_freed_memory",
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    "settings": dict(vars(args), torch_threads=torch.get_num_threads(), arch=ARCH, num_classes=NUM_CLASSES),
    "jax_impls": {
      "attention": resolve_attention_fn("auto").__name__,
      "norm": resolve_norm_impl("auto"),
      "cpu_kernels": "native" if cpu_kernels.enabled() else f"xla ({cpu_kernels.unavailable_reason()})",
    },
    "matmul": matmul_peak(512 if args.quick else 2048, 5),
    "resolutions": {},
  }
  print("matmul peak:", result["matmul"], flush=True)
  for res in args.resolutions.split(","):
    p = setup(res, args.batch, args.sample_batch)
    r = {
      "params": count_params(p["params"]),
      "params_torch": sum(x.numel() for x in p["torch_model"].parameters()),
    }
    r["forward_max_abs_diff"] = forward_parity(p)
    r["train"], jx = bench_train(
      p, args.train_rounds, args.train_steps, args.torch_ref_threads, args.train_warmup
    )
    r["pipeline"] = bench_pipeline(p, jx, steps=2 if args.quick else 3)
    peak = result["matmul"]["peak_gflops"] * 1e9
    for k in ("jax", "torch", "torch_ref"):
      if f"{k}_steps_per_s" in r["train"]:
        r["train"][f"mfu_{k}"] = r["train"]["flops_per_step"] * r["train"][f"{k}_steps_per_s"] / peak
    r["sampling"] = bench_sampling(
      p, args.sample_rounds, args.sample_steps, args.guidance, args.torch_ref_threads
    )
    print(res, json.dumps(r)[:700], flush=True)
    result["resolutions"][res] = r
    del p, jx
  if not args.no_memory:
    for res, r in result["resolutions"].items():
      r["memory"] = memory_children(args, res, env)
  result["machine"]["load_avg_end"] = os.getloadavg()
  result["wall_s"] = time.time() - t_start
  result["targets"] = targets_met(result)
  result["targets_vs_torch_ref"] = targets_met(result, "ratio_vs_torch_ref")
  result["readme_table"] = "\n".join(readme_table(result))
  os.makedirs(args.out, exist_ok=True)
  name = os.path.join(args.out, "bench_unet_quick" if args.quick else "bench_unet")
  with open(name + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(name + ".md", "w") as f:
    f.write(write_markdown(result))
  print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
  main()
