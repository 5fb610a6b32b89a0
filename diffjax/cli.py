"""Command line: ``python -m diffjax train|sample|distill|train-judge|eval|edit ...`` (only it reads flags).

  python -m diffjax train --config configs/digits_ddpm.py[:smoke] --workdir W [--config.key=value ...]
  python -m diffjax sample --workdir W --sampler ddim --steps 50 --guidance 2.0 --num 64 \
      [--labels 3,3,7] --out S.npz
  python -m diffjax sample --workdir W --prompt "a 3 to the left of a 5" [--prompt ...] --guidance 4 \
      --out S.npz   # text-to-image workdirs (python -m diffjax.training.text_main)
  python -m diffjax sample --pretrained DIR --prompt "..." --steps 25 --guidance 7.5 --out S.npz \
      [--image IN.png --strength 0.6] [--controlnet C --control-image C.png]   # diffusers SD pipelines
  python -m diffjax distill --config configs/digits_distill.py[:smoke] --teacher T --workdir W \
      [--config.key=value ...]   # progressive / guided distillation of the model trained in T
  python -m diffjax train-judge --source digits|mnist_idx [--path P] --out J.safetensors
  python -m diffjax eval --samples S.npz [--judge J.safetensors] [--inception I.safetensors] \
      [--reference-source digits|mnist_idx --reference-path P --reference-split train] [--out R.json] \
      [--workdir W]   # also the held-out NLL bound in bits/dim of the model trained in W
  python -m diffjax edit --workdir W --image IN.png --strength 0.6 [--label 3] [--mask M.png] --out S.npz
  python -m diffjax edit --workdir W --prompt "a 3 to the left of a 5" --edit "a 3 to the left of a 8" \
      [--cross-replace 0.8 --self-replace 0.4 --blend-words 8 --reweight WORD=SCALE] --out S.npz

Bad input ends the program with one line ``error: ...`` naming what was wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from diffjax.cli_control import CONTROL_COMMANDS, add_control_parsers, cmd_control
from diffjax.cli_edit import add_edit_parser, cmd_edit
from diffjax.cli_pretrained import (
  DEFAULT_GUIDANCE,
  add_pretrained_arguments,
  cmd_sample_pretrained,
  reject_pretrained_only,
)


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  rest, overrides = [], {}
  it = iter(range(len(argv)))
  for i in it:
    a = argv[i]
    if a.startswith("--config."):
      key, eq, value = a[len("--config.") :].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ValueError(f"{a} needs a value (--config.{key}=VALUE)")
        value = argv[i + 1]
        next(it)
      overrides[key] = value
    else:
      rest.append(a)
  return rest, overrides


def _parse_labels(text: str | None) -> list[int] | None:
  if text is None:
    return None
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None


def cmd_train(args, overrides: dict[str, str]) -> int:
  from diffjax.config_files import apply_overrides, load_config
  from diffjax.training.loop import train_and_evaluate

  config = apply_overrides(load_config(args.config), overrides)
  result = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
  print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()})
  return 0


def cmd_distill(args, overrides: dict[str, str]) -> int:
  import json

  from diffjax.config_files import apply_overrides, load_config
  from diffjax.distillation import run_distillation

  if not os.path.isdir(args.teacher):
    raise FileNotFoundError(f"--teacher work directory {args.teacher!r} does not exist")
  config = apply_overrides(load_config(args.config), overrides)
  summaries = run_distillation(
    config, teacher_workdir=args.teacher, workdir=args.workdir, progress=not args.no_progress
  )
  for s in summaries:
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()}))
  return 0


def cmd_sample(args) -> int:
  import jax

  from diffjax.data import to_uint8
  from diffjax.images import save_image_grid
  from diffjax.sampling import make_generate
  from diffjax.training.builders import image_shape
  from diffjax.training.restore import load_trained
  from diffjax.training.workdir import read_config

  if args.guidance is None:
    args.guidance = DEFAULT_GUIDANCE if args.pretrained else 1.0
  if args.pretrained:
    return cmd_sample_pretrained(args)
  if not args.workdir:
    raise ValueError("sample needs --workdir W (a diffjax run) or --pretrained DIR (a diffusers pipeline)")
  reject_pretrained_only(args)
  if args.num is not None and args.num < 1:
    raise ValueError(f"--num must be >= 1, got {args.num}")
  config = read_config(args.workdir)
  if "text" in config:
    return _sample_text(args)
  if args.prompt:
    raise ValueError(
      f"--prompt needs a text-to-image workdir; {args.workdir!r} holds a class-conditional model (use --labels)"
    )
  model, schedule, params = load_trained(
    config, args.workdir, step=args.checkpoint_step, ema=not args.raw_params
  )
  labels = _parse_labels(args.labels)
  nc = model.num_classes
  num = args.num or (len(labels) if labels else 64)
  if labels:
    labels = np.resize(np.asarray(labels), num)
  else:
    labels = np.arange(num) % (nc or 1)
  generate = make_generate(
    model=model,
    schedule=schedule,
    image_shape=image_shape(config),
    sampler=args.sampler,
    prediction=config.diffusion.prediction,
    spacing=args.spacing,
  )
  images = generate(
    params, jax.random.key(args.seed), labels, num_steps=args.steps, guidance=args.guidance, eta=args.eta
  )
  images = to_uint8(np.asarray(jax.device_get(images)))
  out = args.out or os.path.join(args.workdir, "samples.npz")
  if not out.endswith(".npz"):
    raise ValueError(f"--out must end with .npz, got {out!r}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, images=images, labels=labels.astype(np.int32))
  png = out[:-4] + ".png"
  save_image_grid(images, png, nrow=nc if (nc and num % nc == 0 and not args.labels) else None)
  print(f"wrote {images.shape[0]} images to {out} and {png}")
  return 0


def _sample_text(args) -> int:
  """``sample`` on a text-to-image workdir: ``--prompt`` (repeatable) cycled to ``--num`` images."""
  import jax

  from diffjax.data import to_uint8
  from diffjax.images import save_image_grid
  from diffjax.models.text_encoder import minilm_dir
  from diffjax.models.text_tokenizer import PromptTokenizer
  from diffjax.text_sampling import make_text_generate
  from diffjax.training.text_builders import load_text_run
  from diffjax.training.workdir import read_config

  if args.labels:
    raise ValueError(
      f"--labels apply to class-conditional models; {args.workdir!r} is text-to-image: use --prompt"
    )
  if not args.prompt:
    raise ValueError(f"{args.workdir!r} is a text-to-image workdir: give --prompt TEXT (repeatable)")
  out = args.out or os.path.join(args.workdir, "samples.npz")
  if not out.endswith(".npz"):
    raise ValueError(f"--out must end with .npz, got {out!r}")
  prompts = [str(p) for p in np.resize(np.asarray(args.prompt), args.num or len(args.prompt))]
  max_length = read_config(args.workdir).text.max_length
  try:  # before loading the model: a too-long prompt fails fast
    PromptTokenizer.from_file(minilm_dir() / "tokenizer.json").encode(prompts, max_length=max_length)
  except ValueError as err:
    raise ValueError(f"--prompt: {str(err).split('; shorten')[0]} of this model's text encoder") from None
  run = load_text_run(args.workdir, step=args.checkpoint_step, ema=not args.raw_params)
  cond = run.prompts.encode(prompts)
  generate = make_text_generate(
    model_fn=run.model_fn,
    schedule=run.schedule,
    sample_shape=run.sample_shape,
    null_cond=run.prompts.null_condition(),
    sampler=args.sampler,
    prediction=run.config.diffusion.prediction,
    spacing=args.spacing,
    codec=run.codec,
  )
  images = generate(
    run.params, jax.random.key(args.seed), cond, num_steps=args.steps, guidance=args.guidance, eta=args.eta
  )
  images = to_uint8(np.asarray(jax.device_get(images)))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, images=images, prompts=np.asarray(prompts))
  png = out[:-4] + ".png"
  save_image_grid(images, png)
  print(f"wrote {images.shape[0]} images to {out} and {png}")
  return 0


def cmd_train_judge(args) -> int:
  import json

  from diffjax.data import load_dataset
  from diffjax.eval import save_judge, train_judge

  if not args.out.endswith(".safetensors"):
    raise ValueError(f"--out must end with .safetensors, got {args.out!r}")
  if not 0.0 <= args.holdout < 1.0:
    raise ValueError(f"--holdout must be a fraction in [0, 1), got {args.holdout}")
  ds = load_dataset(source=args.source, path=args.path, split=args.split)
  params, info = train_judge(
    ds,
    seed=args.seed,
    steps=args.steps,
    batch_size=args.batch_size,
    learning_rate=args.learning_rate,
    holdout=args.holdout or None,
  )
  save_judge(args.out, params, info)
  print(json.dumps(info, indent=2))
  print(f"wrote judge to {args.out}")
  return 0


def _heldout_likelihood(args) -> dict:
  """NLL bound in bits/dim of the model in ``args.workdir`` on its config's held-out images."""
  import jax

  from diffjax.eval.likelihood import heldout_bits_per_dim
  from diffjax.training import builders
  from diffjax.training.restore import load_trained
  from diffjax.training.step import make_model_fn
  from diffjax.training.workdir import read_config

  config = read_config(args.workdir)
  if args.reference_path and config.data.source == args.reference_source:
    config.data.path = args.reference_path  # The same data, at this machine's path.
  model, schedule, params = load_trained(config, args.workdir, step=args.checkpoint_step)
  _, heldout = builders.load_data(config)
  if len(heldout) == 0:
    raise ValueError(f"--workdir {args.workdir!r}: its config holds out no images (data.holdout)")
  t_samples = args.bpd_t_samples if args.bpd_t_samples is not None else config.eval.num_t_samples
  if t_samples is not None and t_samples >= schedule.num_timesteps:
    t_samples = None  # every term: the exact bound
  nll = heldout_bits_per_dim(
    model_fn=make_model_fn(model, train=False),
    params=params,
    schedule=schedule,
    dataset=heldout,
    key=jax.random.key(args.seed),
    prediction=config.diffusion.prediction,
    conditional=model.num_classes is not None,
    num_t_samples=t_samples,
  )
  return {
    "nll_bits_per_dim": nll["bpd"],
    "nll_bits_per_dim_stderr": nll["bpd_stderr"],
    "nll_num_examples": nll["num_examples"],
    "nll_t_samples": "all" if nll["num_t_samples"] is None else nll["num_t_samples"],
    "workdir": args.workdir,
  }


def cmd_eval(args) -> int:
  import json
  import zipfile

  from diffjax.data import load_dataset, validate_images
  from diffjax.eval import (
    features,
    frechet_distance_from_features,
    frechet_distance_infinity,
    inception_features,
    load_inception,
    load_judge,
  )
  from diffjax.eval.metrics import SampleScorer

  if not args.judge and not args.inception:
    raise ValueError("eval needs --judge J.safetensors, --inception INCEPTION.safetensors, or both")
  if not os.path.isfile(args.samples):
    raise FileNotFoundError(f"--samples file '{args.samples}' does not exist")
  try:
    with np.load(args.samples) as data:
      if "images" not in data.files:
        raise ValueError(f"--samples '{args.samples}' has no 'images' array (has {data.files})")
      images = data["images"]
      labels = None if args.ignore_labels or "labels" not in data.files else data["labels"]
  except (OSError, zipfile.BadZipFile) as err:
    raise ValueError(f"--samples '{args.samples}' is not a readable .npz file: {err}") from err
  if args.inception and args.inception_batch_size < 1:
    raise ValueError(f"--inception-batch-size must be >= 1, got {args.inception_batch_size}")
  if args.bpd_t_samples is not None and args.bpd_t_samples < 1:
    raise ValueError(f"--bpd-t-samples must be >= 1, got {args.bpd_t_samples}")
  validate_images(images, name="images")
  if args.fd_infinity and images.shape[0] < 8:
    raise ValueError(
      f"--fd-infinity needs at least 8 samples to fit FD(N) = FD_inf + c / N, got {images.shape[0]}"
    )
  reference = load_dataset(source=args.reference_source, path=args.reference_path, split=args.reference_split)
  judge, variables = None, None
  if args.judge:  # A judge trained on other data than the reference is refused.
    judge = load_judge(args.judge, expected_fingerprint=reference.fingerprint())
  if args.inception:
    variables = load_inception(args.inception)
  result = {}
  if judge:
    scorer = SampleScorer(judge_params=judge[0], judge_info=judge[1], reference=reference)
    result.update(scorer(images, labels))
    if args.fd_infinity:  # Chong & Forsyth 2020: the small-sample bias of the Fréchet distance removed.
      fit = frechet_distance_infinity(features(judge[0], images), scorer.reference_features)
      result["frechet_distance_infinity"] = fit["frechet_distance_infinity"]
  if variables:
    if images.shape[0] < 2 or len(reference) < 2:
      raise ValueError(
        f"inception FID needs at least 2 samples and 2 reference images, got {images.shape[0]} and "
        f"{len(reference)}"
      )
    bs = args.inception_batch_size
    gen = inception_features(variables, images, batch_size=bs)
    real = inception_features(variables, reference.images, batch_size=bs)
    result["inception_fid"] = frechet_distance_from_features(gen, real)
    if args.fd_infinity:
      result["inception_fid_infinity"] = frechet_distance_infinity(gen, real)["frechet_distance_infinity"]
    result.setdefault("num_samples", int(images.shape[0]))
    result.setdefault("num_reference", len(reference))
  if args.workdir:
    result.update(_heldout_likelihood(args))
  result["samples"] = args.samples
  if judge:
    info = judge[1]
    result.update(
      judge=args.judge, judge_data=info.get("data_name"), judge_data_fingerprint=info.get("data_fingerprint")
    )
  if variables:
    result["inception"] = args.inception
  result.update(reference=reference.name, reference_fingerprint=reference.fingerprint())
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m diffjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train (or resume) a model in a work directory")
  t.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  t.add_argument("--workdir", required=True)
  t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  s = sub.add_parser("sample", help="sample from a trained work directory or a diffusers pipeline")
  s.add_argument("--workdir", default=None)
  s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "dpm_solver++"])
  s.add_argument("--steps", type=int, default=50, help="DDIM / DPM-Solver++ steps (1..T)")
  s.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]")
  s.add_argument(
    "--spacing",
    default=None,
    choices=["uniform", "quadratic", "trailing"],
    help="timestep subset (default: uniform for ddim, trailing for dpm_solver++)",
  )
  s.add_argument(
    "--guidance",
    type=float,
    default=None,
    help="classifier-free guidance scale (default 1 = none; 7.5 for --pretrained)",
  )
  s.add_argument("--num", type=int, default=None, help="number of images")
  s.add_argument("--labels", default=None, help="comma-separated class labels, repeated to --num")
  s.add_argument(
    "--prompt",
    action="append",
    default=None,
    help="text-to-image workdirs: a prompt (repeatable, cycled to --num)",
  )
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--checkpoint-step", type=int, default=None)
  s.add_argument("--raw-params", action="store_true", help="use raw instead of EMA parameters")
  s.add_argument("--out", default=None, help="output .npz (a .png grid is written beside it)")
  add_pretrained_arguments(s)
  dd = sub.add_parser("distill", help="progressive or guided distillation of a trained model, stage by stage")
  dd.add_argument("--config", required=True, help="configs/digits_distill.py[:variant]")
  dd.add_argument("--teacher", required=True, help="work directory of the trained teacher")
  dd.add_argument("--workdir", required=True, help="holds one subdirectory per stage; rerun to resume")
  dd.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  j = sub.add_parser("train-judge", help="train the judge classifier whose features `eval` uses")
  j.add_argument("--source", default="digits", help="dataset source: digits, mnist_idx, tfds:<name>")
  j.add_argument("--path", default=None, help="IDX directory for mnist_idx")
  j.add_argument("--split", default="train")
  j.add_argument("--out", required=True, help="output .safetensors judge file")
  j.add_argument("--steps", type=int, default=1500)
  j.add_argument("--batch-size", type=int, default=128)
  j.add_argument("--learning-rate", type=float, default=2e-3)
  j.add_argument("--holdout", type=float, default=0.1, help="held-out fraction for the accuracy (0 = none)")
  j.add_argument("--seed", type=int, default=0)
  e = sub.add_parser(
    "eval", help="Frechet distance, precision/recall and class accuracy of samples; standard FID"
  )
  e.add_argument("--samples", required=True, help=".npz with 'images' (uint8 [N,H,W,C]) and 'labels'")
  e.add_argument("--judge", default=None, help=".safetensors judge from train-judge")
  e.add_argument(
    "--inception",
    default=None,
    help="FID Inception-v3 weights (.safetensors, see diffjax.eval.inception): adds inception_fid",
  )
  e.add_argument("--inception-batch-size", type=int, default=50, help="images per Inception forward pass")
  e.add_argument("--reference-source", default="digits", help="real data: digits, mnist_idx, tfds:<name>")
  e.add_argument("--reference-path", default=None, help="IDX directory for mnist_idx")
  e.add_argument("--reference-split", default="train")
  e.add_argument("--ignore-labels", action="store_true", help="skip class accuracy (unconditional samples)")
  e.add_argument(
    "--fd-infinity",
    action="store_true",
    help="also the Fréchet distance extrapolated to infinitely many samples (FD-infinity, Chong & Forsyth 2020)",
  )
  e.add_argument("--out", default=None, help="also write the JSON result here")
  e.add_argument("--workdir", default=None, help="also report this model's held-out NLL in bits/dim")
  e.add_argument(
    "--bpd-t-samples", type=int, default=None, help="stratified timesteps per image (default: the config's)"
  )
  e.add_argument(
    "--checkpoint-step", type=int, default=None, help="checkpoint of --workdir (default: latest)"
  )
  e.add_argument("--seed", type=int, default=0, help="noise seed of the likelihood bound")
  add_edit_parser(sub)
  add_control_parsers(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.command == "train":
      return cmd_train(args, overrides)
    if args.command == "distill":
      return cmd_distill(args, overrides)
    if args.command in CONTROL_COMMANDS:
      return cmd_control(args, overrides)
    if overrides:
      raise ValueError(f"--config.* overrides only apply to `train` and `distill`, got {sorted(overrides)}")
    if args.command == "train-judge":
      return cmd_train_judge(args)
    if args.command == "eval":
      return cmd_eval(args)
    if args.command == "edit":
      return cmd_edit(args)
    if not 0.0 <= args.eta <= 1.0:
      raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    return cmd_sample(args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    msg = str(e).strip("'\"")
    print(f"error: {msg}", file=sys.stderr)
    return 2
