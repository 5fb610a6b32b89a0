"""Fast sampling: distilled students vs DDIM and DPM-Solver++ by step count; guided students vs CFG.

  python -m diffjax train --config configs/digits_ddpm_v.py --workdir runs/digits_v
  python -m diffjax train-judge --source digits --out runs/judges/digits.safetensors
  python -m diffjax distill --config configs/digits_distill.py --teacher runs/digits_v \
      --workdir runs/digits_distill
  python -m diffjax distill --config configs/digits_guided_distill.py --teacher runs/digits_v \
      --workdir runs/digits_guided_distill
  python experiments/distillation.py --teacher runs/digits_v --progressive runs/digits_distill \
      --guided runs/digits_guided_distill --judge runs/judges/digits.safetensors

Part one (Salimans & Ho 2022, Fig. 4 in shape): class-conditional samples (no guidance) of the teacher
with deterministic DDIM and with DPM-Solver++(2M) at 64/32/16/8/4/2/1 steps, and of each progressively
distilled student at its own step count, all on the trailing grid, one forward pass per step, every row
from the same labels and initial noise. Part two (Meng et al. 2023, in shape): at w in {1, 2, 4}, the CFG
teacher (two passes per step) against the guided students (one pass per step, w as an input). Scores are
Fréchet distance (FD) on judge features, class accuracy of the judge, precision/recall; time is wall clock
per sample at the given batch size after compilation. Writes ``experiments/results/distillation.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import RESULTS, balanced_labels, load_run, load_scorer, machine, sample_timed, write_results

from diffjax.data import load_dataset
from diffjax.distillation import GUIDED_STAGE, load_stage, make_student_generate, stage_names
from diffjax.images import save_image_grid
from diffjax.sampling import make_generate


def _stage_times(workdir: str) -> list[dict]:
  out = []
  for name in stage_names(workdir):
    path = os.path.join(workdir, name, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      recs = [json.loads(ln) for ln in f if ln.strip()]
    recs = [r for r in recs if "loss" in r]
    if recs:
      out.append(
        {
          "stage": name,
          "updates": recs[-1]["step"],
          "wall_s": round(recs[-1]["wall_s"], 1),
          "loss": recs[-1]["loss"],
        }
      )
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", help="work directory of the v-prediction teacher")
  p.add_argument("--progressive", default=None, help="work directory of `distill` with digits_distill.py")
  p.add_argument("--guided", default=None, help="work directory of `distill` with digits_guided_distill.py")
  p.add_argument("--judge", help="judge .safetensors trained on the same data")
  p.add_argument("--num", type=int, default=500, help="samples per row")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, nargs="+", default=[64, 32, 16, 8, 4, 2, 1])
  p.add_argument("--reference-steps", type=int, default=256, help="an extra teacher DDIM row (0: none)")
  p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
  p.add_argument(
    "--cfg-steps", type=int, nargs="+", default=[64, 32, 16, 8], help="step counts of the CFG teacher"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="distillation")
  p.add_argument(
    "--rerender", action="store_true", help="only recompute checks and Markdown of results/NAME.json"
  )
  a = p.parse_args()
  if a.rerender:
    return rerender(a.name)
  if not (a.teacher and a.judge):
    p.error("--teacher and --judge are required")
  t_start = time.perf_counter()

  teacher = load_run(a.teacher)
  scorer, judge_info = load_scorer(a.judge, teacher)
  labels = balanced_labels(a.num, teacher.num_classes)
  pred = teacher.config.diffusion.prediction
  common = {"schedule": teacher.schedule, "image_shape": teacher.image_shape, "prediction": pred}
  rows = []

  def record(part, method, steps, passes, generate, params, grid=None, **kw):
    images, seconds = sample_timed(
      generate, params, labels=labels, batch_size=a.batch_size, seed=a.seed, num_steps=steps, **kw
    )
    score = scorer(images, labels)
    row = {
      "part": part,
      "method": method,
      "guidance": kw.get("guidance", 1.0),
      "steps": steps,
      "forward_passes": passes,
      "ms_per_sample": round(1000 * seconds / a.num, 3),
      **score,
    }
    rows.append(row)
    print(
      f"{part} {method:22s} w={row['guidance']:g} steps={steps:4d} passes={passes:4d}: "
      f"FD {score['frechet_distance']:.3f} acc {score['class_accuracy']:.3f} "
      f"({row['ms_per_sample']:.2f} ms/sample)",
      flush=True,
    )
    if grid:
      save_image_grid(images[:100], os.path.join(RESULTS, f"{a.name}_{grid}.png"), nrow=teacher.num_classes)
    return row

  # Part one: no guidance, one pass per step.
  ddim = make_student_generate(model=teacher.model, sampler="ddim", **common)
  dpm = make_student_generate(model=teacher.model, sampler="dpm_solver++", **common)
  if a.reference_steps:
    record("steps", "teacher DDIM", a.reference_steps, a.reference_steps, ddim, teacher.params)
  for s in a.steps:
    record("steps", "teacher DDIM", s, s, ddim, teacher.params, grid="teacher_ddim64" if s == 64 else None)
    record("steps", "teacher DPM-Solver++", s, s, dpm, teacher.params)
  if a.progressive:
    for name in stage_names(a.progressive):
      model, _, params, cfg = load_stage(a.progressive, name)
      n = int(cfg.stage.student_steps)
      gen = make_student_generate(model=model, sampler="ddim", **common)
      record("steps", "distilled student", n, n, gen, params, grid=f"student{n}" if n in (1, 4) else None)

  # Part two: guidance. The CFG teacher runs conditional and null passes (two per step, batched).
  cfg_gen = make_generate(model=teacher.model, sampler="ddim", spacing="trailing", **common)
  guided = []
  if a.guided:
    for name in stage_names(a.guided):
      model, _, params, cfg = load_stage(a.guided, name)
      guided.append(
        (name, int(cfg.stage.student_steps), make_student_generate(model=model, **common), params)
      )
  for w in a.guidance:
    for s in a.cfg_steps:
      record("guided", "CFG teacher DDIM", s, 2 * s, cfg_gen, teacher.params, guidance=w, eta=0.0)
    for name, n, gen, params in guided:
      method = "guided student (stage 1)" if name == GUIDED_STAGE else "guided distilled student"
      grid = (
        f"guided{n}_w{w:g}"
        if (w == 2.0 and name != GUIDED_STAGE and n == min(g[1] for g in guided))
        else None
      )
      record("guided", method, n, n, gen, params, grid=grid, guidance=w)

  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "teacher": a.teacher,
    "teacher_trained_steps": int(teacher.config.training.num_steps),
    "teacher_prediction": pred,
    "judge": a.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "num_samples": a.num,
    "num_reference": scorer.num_reference,
    "batch_size": a.batch_size,
    "seed": a.seed,
    "stages": {k: _stage_times(v) for k, v in (("progressive", a.progressive), ("guided", a.guided)) if v},
    "rows": rows,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  result["checks"] = _checks(result)
  write_results(a.name, result, _markdown(a.name, result))


def _find(rows, part, method, steps, w=1.0):
  keys = ("part", "method", "steps", "guidance")
  return next((r for r in rows if tuple(r[k] for k in keys) == (part, method, steps, w)), None)


def _checks(result: dict) -> dict:
  """The issue's claims, from the rows: the 4-step student vs the teacher; guided students vs CFG."""
  rows = result["rows"]
  full = max((r["steps"] for r in rows if r["method"] == "teacher DPM-Solver++"), default=64)
  fd = lambda r: r["frechet_distance"]
  checks = {}
  t_full, s4 = _find(rows, "steps", "teacher DDIM", full), _find(rows, "steps", "distilled student", 4)
  d4, p4 = _find(rows, "steps", "teacher DDIM", 4), _find(rows, "steps", "teacher DPM-Solver++", 4)
  if t_full and s4:
    checks[f"student4_over_teacher_ddim{full}_fd_ratio"] = round(fd(s4) / fd(t_full), 3)
    checks["student4_within_1.2x_of_teacher"] = fd(s4) <= 1.2 * fd(t_full)
    if d4 and p4:
      checks["ddim4_over_student4_fd_ratio"] = round(fd(d4) / fd(s4), 2)
      checks["dpm_solver4_over_student4_fd_ratio"] = round(fd(p4) / fd(s4), 2)
  # Guided students against the CFG teacher at its full step count (two passes per step).
  for w in sorted({r["guidance"] for r in rows if r["part"] == "guided"}):
    cfg = _find(rows, "guided", "CFG teacher DDIM", full, w)
    students = [r for r in rows if r["part"] == "guided" and r["guidance"] == w and "student" in r["method"]]
    for r in students if cfg else []:
      checks[f"w{w:g}_student{r['steps']}_vs_cfg_teacher{full}"] = {
        "accuracy_difference": round(r["class_accuracy"] - cfg["class_accuracy"], 3),
        "fd_ratio": round(fd(r) / fd(cfg), 3),
        "forward_passes": f"{r['forward_passes']} vs {cfg['forward_passes']}",
        "time_ratio": round(r["ms_per_sample"] / cfg["ms_per_sample"], 2),
      }
  return checks


def rerender(name: str) -> None:
  """Recomputes the checks and the Markdown of an existing ``results/<name>.json`` without sampling."""
  path = os.path.join(RESULTS, f"{name}.json")
  with open(path) as f:
    result = json.load(f)
  if "num_reference" not in result:  # written before the field existed: the teacher's whole dataset
    data = load_run(result["teacher"]).config.data
    result["num_reference"] = len(load_dataset(source=data.source, path=data.get("path"), split=data.split))
  result["checks"] = _checks(result)
  write_results(name, result, _markdown(name, result))


def _markdown(name: str, result: dict) -> str:
  lines = [
    f"# {name}: progressive and guided distillation on 8x8 digits\n",
    (
      f"`{result['command']}` on {result['machine']}. {result['num_samples']} samples per row, the same "
      "labels (balanced) and initial noise in every row, all samplers on the trailing grid (t from T - 1), "
      f"deterministic. FD: Fréchet distance on judge features against all {result['num_reference']} real "
      "images (lower is better); accuracy: the judge's class agreement (judge held-out accuracy on real "
      f"images {result['judge_heldout_accuracy']}). Time: wall clock per sample at batch "
      f"{result['batch_size']} after compilation, on a CPU shared with other jobs: compare within a table, "
      "roughly.\n"
    ),
  ]
  for key, title in (("progressive", "Progressive distillation"), ("guided", "Guided distillation")):
    st = result["stages"].get(key)
    if st:
      lines += [
        f"## {title}: stages\n",
        "| stage | updates | wall clock (s) | final loss |",
        "|---|---|---|---|",
      ]
      lines += [f"| {s['stage']} | {s['updates']} | {s['wall_s']:.0f} | {s['loss']:.2e} |" for s in st]
      lines.append("")
  header = [
    "| method | w | steps | forward passes | FD | accuracy | precision | recall | ms / sample |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for part, title in (
    ("steps", "Quality vs steps (no guidance)"),
    ("guided", "Guided students vs the CFG teacher"),
  ):
    sel = [r for r in result["rows"] if r["part"] == part]
    if not sel:
      continue
    lines += [f"## {title}\n", *header]
    for r in sel:
      lines.append(
        f"| {r['method']} | {r['guidance']:g} | {r['steps']} | {r['forward_passes']} | "
        f"{r['frechet_distance']:.3f} | {r['class_accuracy']:.3f} | {r['precision']:.3f} | "
        f"{r['recall']:.3f} | {r['ms_per_sample']:.2f} |"
      )
    lines.append("")
  grids = sorted(f for f in os.listdir(RESULTS) if f.startswith(f"{name}_") and f.endswith(".png"))
  if grids:
    lines += [
      "Sample grids (one column per class, first 100 samples of a row): "
      + ", ".join(f"`{g}`" for g in grids),
      "",
    ]
  checks = result["checks"]
  lines += ["## Checks\n"] + [f"- {k}: {v}" for k, v in checks.items() if not isinstance(v, dict)]
  pairs = {k: v for k, v in checks.items() if isinstance(v, dict)}
  if pairs:
    lines += [
      "",
      "Guided students against the CFG teacher at its full step count:\n",
      "| comparison | accuracy difference | FD ratio | forward passes | time ratio |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {k} | {v['accuracy_difference']:+.3f} | {v['fd_ratio']:.3f} | {v['forward_passes']} | "
      f"{v['time_ratio']:.2f} |"
      for k, v in pairs.items()
    ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
