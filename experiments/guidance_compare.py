"""Classifier guidance (Dhariwal & Nichol 2021) vs classifier-free guidance (Ho & Salimans 2022).

  python experiments/guidance_compare.py --workdir runs/mnist --classifier runs/mnist_classifier \
      --judge runs/judges/mnist.safetensors --data-path ../shared/data/mnist
  python experiments/guidance_compare.py --workdir runs/digits --classifier runs/digits_classifier \
      --judge runs/judges/digits.safetensors --name guidance_compare_digits

One class-conditional DDPM trained with label dropout (``configs/mnist_ddpm.py``, ``configs/digits_ddpm.py``) provides both sides:
its null-class branch is an unconditional model, which classifier guidance steers with the gradient of a
noise-conditional classifier (``python -m diffjax train-classifier``, :mod:`diffjax.guidance.classifier`):
DDIM with ``eps - w sqrt(1 - ᾱ_t) grad log p(y | x_t)`` and, optionally, DDPM with the mean shift
``w Σ grad log p(y | x_t)``; classifier-free guidance combines its conditional and null branches,
``eps_u + s (eps_c - eps_u)``. Every row samples the same balanced labels from the same initial noise;
the judge scores class accuracy (fidelity to the requested class), Fréchet distance, precision and recall.

Cost per sample: network passes per sampling step (CFG: the U-Net on a doubled batch = 2 U-Net forwards;
classifier guidance: one U-Net forward plus a classifier forward and backward), XLA's FLOP count of one
guided evaluation (``cost_analysis`` of the compiled function, per sample), and the measured wall time
per sample (all rows in one run on the same machine; the load is recorded). Writes
``experiments/results/<name>.json``/``.md`` and a grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trained_run import RowCache, balanced_labels, load_run, load_scorer, machine, sample_timed, write_results

from diffjax.guidance import classifier_free_guidance
from diffjax.guidance.classifier import classifier_guidance, classifier_mean_shift
from diffjax.images import save_image_grid
from diffjax.samplers import ddim_sample, ddpm_sample
from diffjax.training.classifier_run import classifier_fn, load_classifier
from diffjax.training.step import make_model_fn


def make_generators(run, classifier, prediction: str):
  """``generate(params, key, labels, num_steps, guidance, eta)`` for each method (same noise for all)."""
  base = make_model_fn(run.model, train=False)
  clf = classifier_fn(classifier)
  null = run.num_classes
  shape = run.image_shape

  def noise(key, labels):
    return jax.random.normal(jax.random.fold_in(key, 0), (labels.shape[0], *shape)), jax.random.fold_in(
      key, 1
    )

  def guided_fn(method, params, labels, w):
    if method == "cfg":
      return classifier_free_guidance(base, guidance_scale=w, null_cond=jnp.full_like(labels, null)), params[
        "model"
      ]
    fn = classifier_guidance(
      base,
      classifier_fn=clf,
      classifier_params=params["classifier"],
      schedule=run.schedule,
      guidance_scale=w,
      base_cond=lambda y: jnp.full_like(y, null),
      prediction=prediction,
    )
    return fn, params["model"]

  def ddim(method):
    @jax.jit
    def generate(params, key, labels, num_steps, guidance, eta):
      x_T, k = noise(key, labels)
      fn, p = guided_fn(method, params, labels, guidance)
      return ddim_sample(
        model_fn=fn,
        params=p,
        schedule=run.schedule,
        x_T=x_T,
        key=k,
        cond=labels,
        num_steps=num_steps,
        eta=eta,
        prediction=prediction,
      )

    return generate

  @jax.jit
  def cg_ddpm(params, key, labels, guidance):
    x_T, k = noise(key, labels)
    shift = classifier_mean_shift(
      classifier_fn=clf, classifier_params=params["classifier"], labels=labels, guidance_scale=guidance
    )
    return ddpm_sample(
      model_fn=base,
      params=params["model"],
      schedule=run.schedule,
      x_T=x_T,
      key=k,
      cond=jnp.full_like(labels, null),
      prediction=prediction,
      mean_shift_fn=shift,
    )

  return {"cfg": ddim("cfg"), "cg": ddim("cg"), "cg_ddpm": cg_ddpm}, guided_fn


def flops_per_sample(guided_fn, method, params, run, batch: int = 8) -> float | None:
  """XLA's FLOP estimate of one guided model evaluation (one sampling step), per sample."""
  labels = jnp.zeros((batch,), jnp.int32)
  x = jnp.zeros((batch, *run.image_shape))
  t = jnp.full((batch,), 500, jnp.int32)

  def one(params, x, t, labels):
    fn, p = guided_fn(method, params, labels, 2.0)
    return fn(p, x, t, labels)

  try:
    cost = jax.jit(one).lower(params, x, t, labels).compile().cost_analysis()
  except Exception:  # noqa: BLE001 - a backend without cost analysis
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch if cost and "flops" in cost else None


PASSES = {
  "cfg": "2 U-Net forwards (one doubled batch)",
  "cg": "1 U-Net forward + 1 classifier forward + 1 classifier backward",
  "cg_ddpm": "1 U-Net forward + 1 classifier forward + 1 classifier backward",
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="class-conditional DDPM trained with label dropout")
  p.add_argument("--classifier", required=True, help="noise-conditional classifier work directory")
  p.add_argument("--judge", required=True)
  p.add_argument("--data-path", default=None)
  p.add_argument("--num", type=int, default=500, help="samples per row")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
  p.add_argument("--cg-scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
  p.add_argument(
    "--ddpm-scales", type=float, nargs="*", default=[], help="classifier-guided DDPM rows (T steps)"
  )
  p.add_argument("--ddpm-num", type=int, default=100, help="samples per DDPM row")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="guidance_compare")
  a = p.parse_args()
  t_start = time.perf_counter()
  load = os.getloadavg()
  run = load_run(a.workdir)
  classifier, clf_schedule, clf_params, clf_config = load_classifier(a.classifier)
  if not np.allclose(np.asarray(clf_schedule.betas), np.asarray(run.schedule.betas)):
    raise ValueError("the classifier was trained on another noise schedule than the diffusion model")
  scorer, judge_info = load_scorer(a.judge, run, data_path=a.data_path)
  prediction = run.config.diffusion.prediction
  gens, guided_fn = make_generators(run, classifier, prediction)
  params = {"model": run.params, "classifier": clf_params}
  flops = {m: flops_per_sample(guided_fn, m, params, run) for m in ("cfg", "cg")}
  flops["cg_ddpm"] = flops["cg"]
  cache = RowCache(
    a.name,
    {
      "workdir": os.path.abspath(a.workdir),
      "classifier": os.path.abspath(a.classifier),
      "judge": os.path.abspath(a.judge),
      "num": a.num,
      "ddpm_num": a.ddpm_num,
      "seed": a.seed,
      "steps": a.steps,
    },
  )
  plan = (
    [("cg", w) for w in a.cg_scales]
    + [("cfg", s) for s in a.cfg_scales]
    + [("cg_ddpm", w) for w in a.ddpm_scales]
  )
  rows, grids = [], []
  for method, w in plan:
    key = f"{method}:{w:g}"
    if cache.get(key):
      rows.append(cache.get(key))
      print(f"{key}: reused", flush=True)
      continue
    if method == "cg_ddpm":
      n, steps = a.ddpm_num, run.schedule.num_timesteps
      labels = balanced_labels(n, run.num_classes)
      images, seconds = sample_timed(
        gens[method], params, labels=labels, batch_size=min(a.batch_size, n), seed=a.seed, guidance=w
      )
    else:
      n, steps = a.num, a.steps
      labels = balanced_labels(n, run.num_classes)
      images, seconds = sample_timed(
        gens[method],
        params,
        labels=labels,
        batch_size=a.batch_size,
        seed=a.seed,
        num_steps=a.steps,
        guidance=w,
        eta=0.0,
      )
    s = scorer(images, labels)
    row = {
      "method": method,
      "sampler": "DDPM" if method == "cg_ddpm" else f"DDIM-{a.steps}",
      "w": w,
      "num_samples": n,
      "class_accuracy": s["class_accuracy"],
      "frechet_distance": s["frechet_distance"],
      "precision": s["precision"],
      "recall": s["recall"],
      "seconds": round(seconds, 1),
      "seconds_per_sample": seconds / n,
      "steps": steps,
      "passes_per_step": PASSES[method],
      "gflops_per_sample": None if flops[method] is None else flops[method] * steps / 1e9,
    }
    rows.append(row)
    cache.put(key, row)
    grids.append(images[: 2 * run.num_classes])
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
  if grids:
    save_image_grid(
      np.concatenate(grids), os.path.join("experiments/results", f"{a.name}_grid.png"), nrow=run.num_classes
    )

  cg = [r for r in rows if r["method"] == "cg"]
  cfg = [r for r in rows if r["method"] == "cfg"]
  unguided = [r for r in cg if r["w"] == 0]
  best_cg = max(cg, key=lambda r: r["class_accuracy"]) if cg else None
  reaching = [r["w"] for r in cg if r["class_accuracy"] >= 0.9]
  per_sample = {
    m: np.mean([r["seconds_per_sample"] for r in rows if r["method"] == m]) for m in ("cg", "cfg")
  }
  checks = {
    "unconditional_accuracy (cg w=0)": unguided[0]["class_accuracy"] if unguided else None,
    "best_cg_accuracy": None if best_cg is None else best_cg["class_accuracy"],
    "smallest_cg_w_with_accuracy_>=_0.9": min(reaching) if reaching else None,
    "wall_time_ratio_cg_over_cfg (DDIM)": float(per_sample["cg"] / per_sample["cfg"]) if cg and cfg else None,
    "flops_ratio_cg_over_cfg": float(flops["cg"] / flops["cfg"]) if flops["cg"] and flops["cfg"] else None,
  }
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": machine(),
    "load_average_at_start": [round(v, 2) for v in load],
    "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    "workdir": a.workdir,
    "trained_steps": int(run.config.training.num_steps),
    "classifier": a.classifier,
    "classifier_training_steps": int(clf_config.training.num_steps),
    "judge": a.judge,
    "judge_heldout_accuracy": judge_info.get("heldout_accuracy"),
    "seed": a.seed,
    "rows": rows,
    "checks": checks,
    "wall_s": round(time.perf_counter() - t_start, 1),
  }
  lines = [
    f"# {a.name}: classifier guidance vs classifier-free guidance\n",
    f"`{result['command']}` on {result['machine']} (load average {result['load_average_at_start']} at the start, "
    f"{result['load_average_at_end']} at the end: wall times are inflated, compare them as ratios). "
    f"Diffusion model `{a.workdir}` ({result['trained_steps']} steps; its null class is the unconditional model); "
    f"classifier `{a.classifier}` ({result['classifier_training_steps']} steps on noised images). Same balanced "
    "labels and initial noise in every row. Classifier guidance (cg): the unconditional branch with "
    "eps - w sqrt(1 - ᾱ) ∇log p(y|x_t) (DDIM) or the DDPM mean shifted by w Σ ∇log p(y|x_t) (cg_ddpm, T steps); "
    "classifier-free guidance (cfg): eps_u + w (eps_c - eps_u), w = 1 the conditional model. Judge held-out "
    f"accuracy {judge_info.get('heldout_accuracy')}; Fréchet distance (FD) on judge features against all "
    f"{scorer.num_reference} real images.\n",
    "| method | sampler | w | samples | class accuracy | FD | precision | recall | s / sample | GFLOP / sample |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    gf = "–" if r["gflops_per_sample"] is None else f"{r['gflops_per_sample']:.1f}"
    lines.append(
      f"| {r['method']} | {r['sampler']} | {r['w']:g} | {r['num_samples']} | {r['class_accuracy']:.3f} | "
      f"{r['frechet_distance']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_sample']:.3f} | {gf} |"
    )
  lines.append(
    "\nNetwork passes per sampling step: " + "; ".join(f"{k}: {v}" for k, v in PASSES.items()) + ".\n"
  )
  lines += [f"- {k}: {v}" for k, v in checks.items()]
  lines.append(
    f"\nGrid (two rows per row sampled in this invocation, classes along columns): "
    f"`experiments/results/{a.name}_grid.png`"
    if grids
    else f"\nEvery row was reused from `runs/partial/{a.name}.json` (same settings): no grid this time."
  )
  write_results(a.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
