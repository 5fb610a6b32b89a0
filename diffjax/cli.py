"""Command line: ``python -m diffjax train|sample ...`` (the only place that reads flags).

  python -m diffjax train --config configs/digits_ddpm.py[:smoke] --workdir W [--config.key=value ...]
  python -m diffjax sample --workdir W --sampler ddim --steps 50 --guidance 2.0 --num 64 \
      [--labels 3,3,7] --out S.npz

Bad input ends the program with one line ``error: ...`` naming what was wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


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


def cmd_sample(args) -> int:
  import jax

  from diffjax.data import to_uint8
  from diffjax.images import save_image_grid
  from diffjax.sampling import make_generate
  from diffjax.training.restore import load_trained
  from diffjax.training.workdir import read_config

  if args.num is not None and args.num < 1:
    raise ValueError(f"--num must be >= 1, got {args.num}")
  config = read_config(args.workdir)
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
  from diffjax.training.builders import image_shape

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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m diffjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train (or resume) a model in a work directory")
  t.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  t.add_argument("--workdir", required=True)
  t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  s = sub.add_parser("sample", help="sample from a trained work directory")
  s.add_argument("--workdir", required=True)
  s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
  s.add_argument("--steps", type=int, default=50, help="DDIM steps (1..T)")
  s.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]")
  s.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic", "trailing"])
  s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
  s.add_argument("--num", type=int, default=None, help="number of images")
  s.add_argument("--labels", default=None, help="comma-separated class labels, repeated to --num")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--checkpoint-step", type=int, default=None)
  s.add_argument("--raw-params", action="store_true", help="use raw instead of EMA parameters")
  s.add_argument("--out", default=None, help="output .npz (a .png grid is written beside it)")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.command == "train":
      return cmd_train(args, overrides)
    if overrides:
      raise ValueError(f"--config.* overrides only apply to `train`, got {sorted(overrides)}")
    if not 0.0 <= args.eta <= 1.0:
      raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    return cmd_sample(args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    msg = str(e).strip("'\"")
    print(f"error: {msg}", file=sys.stderr)
    return 2
