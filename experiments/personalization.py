"""Personalization on two-digit MNIST scenes: DreamBooth (fine-tuned per subject) vs FastComposer (none).

    python experiments/personalization.py --base /work/assets/t2i/scenes \
        --judge /work/assets/judges/mnist.safetensors --data-path /work/shared/data/mnist \
        [--root runs/personalize] [--labels 4 7 2] [--num 32] [--pairs 32] [--steps 25] [--guidance 4]

Subjects are distinctive held-out digits: never seen by the base model or by FastComposer's training (the
judge, as in every experiment here, was trained on the whole digit set).
For each ``--labels`` digit:

* **DreamBooth** (``configs/dreambooth.py``) fine-tunes the base U-Net on 4 shots of the subject, with
  prior preservation (weight 1, 100 class images) and without (``:no_prior``);
* **FastComposer** (``configs/fastcomposer.py``, trained once, with the localization loss and without,
  ``:no_loc``) gets the subject's one original image as reference, no fine-tuning.

Measured with the MNIST judge (``personalization_eval.py``): subject fidelity (cosine of judge features
of the subject's cell to the references), prompt fidelity (the other cell's digit, both in order),
language drift on class prompts without the identifier (likeness to the subject, diversity, accuracy);
FastComposer on ``--pairs`` two-subject prompts from pairs of unseen held-out digits ("a 3 to the left
of a 5" with both references): both in order, swapped, merged, identity margin; and each method's time
per new subject. Every trained model is resumable and every finished row is cached (runs/partial), so a
stopped run restarts where it stopped. Writes ``experiments/results/personalization.json``, ``.md``, PNGs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.config_files import apply_overrides, load_config
from diffjax.data import SCENE_TEMPLATES, load_dataset, scene_caption
from diffjax.eval import features_and_logits, load_judge
from diffjax.images import save_image_grid
from diffjax.personalization.subjects import digit_word_positions, left_named_first
from diffjax.training.dreambooth_loop import load_dreambooth, scene_prompts, train_dreambooth
from diffjax.training.fastcomposer_loop import load_fastcomposer, train_fastcomposer
from diffjax.training.personalize_common import base_data_config, base_digits, text_generate
from diffjax.training.text_builders import load_text_run
from experiments import personalization_eval as E
from experiments.personalization_md import markdown
from experiments.trained_run import RESULTS, RowCache, machine, write_results

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(name: str, args, overrides: dict) -> object:
  config = load_config(os.path.join(CONFIGS, name))
  config = apply_overrides(config, {k: str(v) for k, v in overrides.items()})
  config.base_workdir = args.base
  config.data_path = args.data_path
  return config


def _load() -> str:
  return open("/proc/loadavg").read().split()[0] if os.path.isfile("/proc/loadavg") else "?"


def train_all(args, cache: RowCache, variant: str) -> dict:
  """Trains (or finds) every DreamBooth subject model and both FastComposer models; returns their timings."""
  timings = {}
  for label in args.labels:
    for prior in ("prior", "no_prior"):
      name = f"train/dreambooth/{label}/{prior}"
      spec = "dreambooth.py" + (f":{variant}" if variant else (":no_prior" if prior == "no_prior" else ""))
      overrides = {"subject.label": label, "prior.cache_dir": os.path.join(args.root, "class_images")}
      if args.db_steps:
        overrides["training.num_steps"] = args.db_steps
      if variant and prior == "no_prior":
        overrides["prior.weight"] = 0.0
      workdir = os.path.join(args.root, f"dreambooth_{label}_{prior}")
      row = cache.get(name)
      if row is None:
        load0 = _load()
        last = train_dreambooth(_config(spec, args, overrides), workdir, progress=False)
        row = {**last, "load_before": load0, "load_after": _load(), "workdir": workdir}
        cache.put(name, row)
      timings[name] = row
  for loc in ("loc", "no_loc"):
    name = f"train/fastcomposer/{loc}"
    spec = "fastcomposer.py" + (f":{variant}" if variant else (":no_loc" if loc == "no_loc" else ""))
    overrides = {"fastcomposer.localization_weight": 0.0} if (variant and loc == "no_loc") else {}
    if args.fc_steps:
      overrides["training.num_steps"] = args.fc_steps
    workdir = os.path.join(args.root, f"fastcomposer_{loc}")
    row = cache.get(name)
    if row is None:
      last = train_fastcomposer(_config(spec, args, overrides), workdir, progress=False)
      row = {**last, "workdir": workdir}
      cache.put(name, row)
    timings[name] = row
  return timings


class _Samplers:
  """One compiled text sampler (base and DreamBooth models share the U-Net) and one FastComposer sampler."""

  def __init__(self, base, fc):
    self.text, self.fc, self.warm = text_generate(base), fc.generate(), set()

  def run(self, kind: str, fn, num: int, seed: int):
    out = E.sample_batches(fn, num, batch_size=min(num, 64), seed=seed, warm_up=(kind, num) not in self.warm)
    self.warm.add((kind, num))
    return out


def _text_sampler(generate, run, prompts, args):
  cond = run.prompts.encode(prompts)

  def fn(lo, hi, key):
    return generate(
      run.params, key, tuple(c[lo:hi] for c in cond), num_steps=args.steps, guidance=args.guidance
    )

  return fn


def _fc_sampler(fc, generate, prompts, refs, valid, order, args, delay):
  cond = fc.base.prompts.encode(prompts)
  positions = digit_word_positions(fc.base.prompts.tokenizer, prompts)
  refs = np.take_along_axis(refs, order[:, :, None, None, None], axis=1)  # word order
  valid = np.take_along_axis(valid, order, axis=1)

  def fn(lo, hi, key):
    part = tuple(c[lo:hi] for c in cond)
    return generate(
      fc.params,
      key,
      part,
      refs[lo:hi],
      positions[lo:hi],
      valid[lo:hi],
      num_steps=args.steps,
      guidance=args.guidance,
      delay=delay,
    )

  return fn


def _word_order(templates: np.ndarray) -> np.ndarray:
  """``[N, 2]``: the side (0 left, 1 right) named by the first and second digit word of each template."""
  first = np.array([left_named_first(t) for t in SCENE_TEMPLATES])[templates]
  return np.where(first[:, None], [[0, 1]], [[1, 0]]).astype(np.int32)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="trained text-to-image workdir (two-digit scenes)")
  p.add_argument("--judge", required=True)
  p.add_argument("--data-path", default=None, help="MNIST IDX directory (default: the base config's)")
  p.add_argument("--root", default="runs/personalize", help="where the DreamBooth/FastComposer runs go")
  p.add_argument("--labels", type=int, nargs="+", default=[4, 7, 2])
  p.add_argument("--num", type=int, default=32, help="prompts per subject and prompt set")
  p.add_argument("--pairs", type=int, default=32, help="two-subject prompts")
  p.add_argument("--steps", type=int, default=25, help="DDIM steps")
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--delay", type=float, default=0.2, help="FastComposer's delayed-conditioning fraction")
  p.add_argument("--crop", type=int, default=None, help="cell crop for the judge (see scene_halves)")
  p.add_argument("--seed", type=int, default=1234)
  p.add_argument("--db-steps", type=int, default=None, help="DreamBooth steps (default: the config's)")
  p.add_argument("--fc-steps", type=int, default=None, help="FastComposer steps (default: the config's)")
  p.add_argument("--variant", default="", help="config variant for all runs (e.g. smoke, for tests)")
  p.add_argument("--name", default="personalization")
  args = p.parse_args()
  os.makedirs(args.root, exist_ok=True)
  # DreamBooth runs of different subjects compile identical programs: reuse them across runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.root, "jax_cache"))

  base = load_text_run(args.base)
  base_cfg = base_data_config(base.config, args.data_path)
  _, heldout = base_digits(base_cfg)
  d = base_cfg.data
  reference = load_dataset(source=d.source, path=d.get("path"), split=d.split, data_dir=d.get("data_dir"))
  judge, judge_info = load_judge(args.judge, expected_fingerprint=reference.fingerprint())
  size = E.judge_size(judge)
  E.CENTER["mean"] = features_and_logits(judge, heldout.images)[0].mean(axis=0)
  settings = {k: v for k, v in vars(args).items() if k != "name"}
  settings["base_step"] = base.step
  cache = RowCache(args.name, settings)
  timings = train_all(args, cache, args.variant)
  result = {"settings": settings, "timings": timings, "subjects": {}, "machine": machine()}
  fc_runs = {
    loc: load_fastcomposer(timings[f"train/fastcomposer/{loc}"]["workdir"]) for loc in ("loc", "no_loc")
  }
  samplers = _Samplers(base, fc_runs["loc"])
  fc_variants = [(loc, delay) for loc in ("loc", "no_loc") for delay in (args.delay, 0.0)]
  grids = []

  for label in args.labels:
    runs = {"base": base}
    subject = None
    for prior in ("prior", "no_prior"):
      runs[f"dreambooth_{prior}"], subject = load_dreambooth(
        timings[f"train/dreambooth/{label}/{prior}"]["workdir"]
      )
    ref_feats, _ = E.judged(judge, subject.references)
    class_p, others, sides, templates = scene_prompts(label, args.num, seed=args.seed)
    subj_p = scene_prompts(label, args.num, seed=args.seed, identifier=subject.identifier)[0]
    others_of_class = (heldout.labels == label) & (np.arange(len(heldout)) != subject.index)
    same = heldout.images[others_of_class]
    real_f, _ = E.judged(judge, same)
    rows = {
      "real_same_class": E.mean_se(E.cosine_to(real_f, ref_feats)),
      "references_among_themselves": float(
        (ref_feats @ ref_feats.T)[~np.eye(len(ref_feats), dtype=bool)].mean()
      ),
    }
    kw = {
      "sides": sides,
      "label": label,
      "others": others,
      "ref_feats": ref_feats,
      "size": size,
      "crop": args.crop,
    }
    for model, run in runs.items():
      for kind, prompts in (("subject", subj_p), ("class", class_p)):
        key = f"eval/{label}/{model}/{kind}"
        row = cache.get(key)
        if row is None:
          images, secs = samplers.run(
            "text", _text_sampler(samplers.text, run, prompts, args), args.num, args.seed
          )
          row = {**E.subject_metrics(judge, images, **kw), "sampling_s": secs}
          np.save(os.path.join(args.root, f"samples_{label}_{model}_{kind}.npy"), images)
          cache.put(key, row)
        rows[f"{model}/{kind}"] = row
    refs = np.zeros((args.num, 2, *subject.references.shape[1:]), np.float32)
    refs[:, 0] = E.reference_input(subject.references[:1])  # the one original shot
    valid = np.stack([np.ones(args.num), np.zeros(args.num)], axis=1).astype(np.float32)
    # Slot 0 is the subject: reorder to word order (the subject's word comes first when its side is named first).
    order = _word_order(templates)
    subject_first = order[:, 0] == sides
    order = np.where(subject_first[:, None], [[0, 1]], [[1, 0]]).astype(np.int32)
    for loc, delay in fc_variants:
      key = f"eval/{label}/fastcomposer_{loc}/delay{delay:g}"
      row = cache.get(key)
      if row is None:
        fn = _fc_sampler(fc_runs[loc], samplers.fc, class_p, refs, valid, order, args, delay)
        images, secs = samplers.run("fc", fn, args.num, args.seed)
        row = {**E.subject_metrics(judge, images, **kw), "sampling_s": secs}
        np.save(os.path.join(args.root, f"samples_{label}_fastcomposer_{loc}_delay{delay:g}.npy"), images)
        cache.put(key, row)
      rows[f"fastcomposer_{loc}/delay{delay:g}"] = row
    result["subjects"][str(label)] = {"index": subject.index, "prompts": subj_p[:4], "rows": rows}
    grids.append((label, subject, subj_p, class_p))

  # Two subjects from unseen held-out digits, FastComposer only (the base model gets the text alone).
  rng = np.random.default_rng([args.seed, 5])
  a = rng.integers(0, len(heldout), args.pairs)
  b = rng.integers(0, len(heldout), args.pairs)
  clash = heldout.labels[a] == heldout.labels[b]
  while clash.any():
    b[clash] = rng.integers(0, len(heldout), int(clash.sum()))
    clash = heldout.labels[a] == heldout.labels[b]
  labels = np.stack([heldout.labels[a], heldout.labels[b]], axis=1).astype(np.int32)
  templates = rng.integers(0, len(SCENE_TEMPLATES), args.pairs)
  prompts = [
    scene_caption(left=int(x), right=int(y), template=SCENE_TEMPLATES[t])
    for (x, y), t in zip(labels, templates, strict=True)
  ]
  pair_refs = np.stack([E.reference_input(heldout.images[a]), E.reference_input(heldout.images[b])], axis=1)
  fa, _ = E.judged(judge, heldout.images[a])
  fb, _ = E.judged(judge, heldout.images[b])
  pair_feats = np.stack([fa, fb], axis=1)
  pair_rows = {}
  for model in ["base", *[f"fastcomposer_{loc}/delay{delay:g}" for loc, delay in fc_variants]]:
    key = f"eval/pairs/{model}"
    row = cache.get(key)
    if row is None:
      if model == "base":
        fn, kind = _text_sampler(samplers.text, base, prompts, args), "text"
      else:
        loc, delay = model.split("/")[0][len("fastcomposer_") :], float(model.split("delay")[1])
        both = np.ones((args.pairs, 2), np.float32)
        fn = _fc_sampler(
          fc_runs[loc], samplers.fc, prompts, pair_refs, both, _word_order(templates), args, delay
        )
        kind = "fc"
      images, secs = samplers.run(kind, fn, args.pairs, args.seed)
      row = {
        **E.pair_metrics(judge, images, labels=labels, ref_feats=pair_feats, size=size, crop=args.crop),
        "sampling_s": secs,
      }
      np.save(os.path.join(args.root, f"samples_pairs_{model.replace('/', '_')}.npy"), images)
      cache.put(key, row)
    pair_rows[model] = row
  result["pairs"] = {"num": args.pairs, "prompts": prompts[:8], "rows": pair_rows}

  # Time per new subject: DreamBooth's fine-tuning (and class images, once per class) vs one encoder pass.
  fc = fc_runs["loc"]
  encode = jax.jit(lambda p, x: fc.encoder.apply({"params": p}, x))
  one = jnp.asarray(E.reference_input(heldout.images[:1]))
  jax.block_until_ready(encode(fc.params["encoder"], one))
  t0 = time.perf_counter()
  for _ in range(20):
    jax.block_until_ready(encode(fc.params["encoder"], one))
  result["fastcomposer_encode_s"] = (time.perf_counter() - t0) / 20
  result["judge_heldout_accuracy"] = judge_info.get("heldout_accuracy")
  result["grids"] = write_grids(args, grids)
  result["command"] = "python experiments/personalization.py " + " ".join(sys.argv[1:])
  result["uptime"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
  write_results(args.name, result, markdown(result))


GRID_ROWS = [
  "base_subject",
  "dreambooth_prior_subject",
  "dreambooth_no_prior_subject",
  "base_class",
  "dreambooth_prior_class",
  "dreambooth_no_prior_class",
]


def write_grids(args, grids) -> list[str]:
  """One PNG per subject: its shots, then 8 scenes per row of :data:`GRID_ROWS` and FastComposer's."""
  paths = []
  for label, subject, _, _ in grids:
    h, w = subject.scenes.shape[1:3]
    shots = np.zeros((8, h, w, 1), np.uint8)
    k = min(len(subject.references), 8)
    rh, rw = subject.references.shape[1:3]
    shots[:k, (h - rh) // 2 : (h - rh) // 2 + rh, (w // 2 - rw) // 2 : (w // 2 - rw) // 2 + rw] = (
      subject.references[:k]
    )
    rows = [shots]
    for suffix in GRID_ROWS + [f"fastcomposer_loc_delay{args.delay:g}"]:
      rows.append(np.load(os.path.join(args.root, f"samples_{label}_{suffix}.npy"))[:8])
    path = os.path.join(RESULTS, f"{args.name}_{label}.png")
    save_image_grid(np.concatenate(rows), path, nrow=8)
    paths.append(os.path.relpath(path, os.path.dirname(RESULTS)))
  return paths


if __name__ == "__main__":
  main()
