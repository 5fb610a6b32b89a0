"""The ``train-controlnet`` and ``train-classifier`` commands of ``python -m diffjax``.

  python -m diffjax train-controlnet --config configs/mnist_controlnet.py --workdir W \
      --config.base.workdir=runs/mnist [--config.control.kind=low_res ...]
  python -m diffjax train-classifier --config configs/mnist_classifier.py --workdir W [--config.* ...]

Both train (or resume, on an existing work directory) and print the last metrics: a ControlNet on a
frozen trained U-Net (:mod:`diffjax.training.controlnet_run`) and a noise-conditional classifier for
classifier guidance (:mod:`diffjax.training.classifier_run`).
"""

from __future__ import annotations

__all__ = ["CONTROL_COMMANDS", "add_control_parsers", "cmd_control"]

CONTROL_COMMANDS = ("train-controlnet", "train-classifier")


def add_control_parsers(sub) -> None:
  """Adds the two subcommands to an argparse subparsers object."""
  for name, what in zip(CONTROL_COMMANDS, ("a ControlNet on a frozen trained U-Net", "a noisy classifier")):
    p = sub.add_parser(name, help=f"train (or resume) {what} in a work directory")
    p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_control(args, overrides: dict[str, str]) -> int:
  """Runs ``train-controlnet`` or ``train-classifier``."""
  from diffjax.config_files import apply_overrides, load_config

  config = apply_overrides(load_config(args.config), overrides)
  if args.command == "train-controlnet":
    if "base" not in config or "control" not in config:
      raise ValueError(f"--config {args.config!r} is not a ControlNet config (it needs 'base' and 'control')")
    from diffjax.training.controlnet_run import train_controlnet as train
  else:
    if "model" not in config or "num_classes" not in config.model:
      raise ValueError(f"--config {args.config!r} is not a classifier config (it needs model.num_classes)")
    from diffjax.training.classifier_run import train_classifier as train
  result = train(config, args.workdir, progress=not args.no_progress)
  print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()})
  return 0
