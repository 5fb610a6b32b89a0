"""Command line of personalisation: ``python -m diffjax.training.personalize_main``.

    python -m diffjax.training.personalize_main --config configs/dreambooth.py[:variant] --workdir W \
        [--config.base_workdir=runs/text/scenes --config.training.num_steps=300 ...]
    python -m diffjax.training.personalize_main --config configs/fastcomposer.py[:variant] --workdir W ...

``config.method`` says which: ``"dreambooth"`` fine-tunes the base text-to-image model on one subject
(:func:`diffjax.training.dreambooth_loop.train_dreambooth`), ``"fastcomposer"`` trains the subject
encoder, fusion MLP and U-Net once for all subjects
(:func:`diffjax.training.fastcomposer_loop.train_fastcomposer`). Both resume on an existing workdir and
print the last metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffjax.config_files import apply_overrides, load_config

METHODS = ("dreambooth", "fastcomposer")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m diffjax.training.personalize_main", description=__doc__)
  p.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true")
  args, rest = p.parse_known_args(argv)
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      p.error(f"unrecognised argument {item!r} (overrides look like --config.training.num_steps=100)")
    key, value = item[len("--config.") :].split("=", 1)
    overrides[key] = value
  try:
    config = apply_overrides(load_config(args.config), overrides)
    method = config.get("method")
    if method == "dreambooth":
      from diffjax.training.dreambooth_loop import train_dreambooth as train
    elif method == "fastcomposer":
      from diffjax.training.fastcomposer_loop import train_fastcomposer as train
    else:
      raise ValueError(f"config.method={method!r} is not one of {METHODS}")
    last = train(config, args.workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in last.items()}))
  return 0


if __name__ == "__main__":
  from diffjax.host_memory import reexec_with_tuned_malloc

  reexec_with_tuned_malloc()  # one malloc heap for XLA's threads (diffjax.host_memory)
  sys.exit(main())
