"""Command line of text-to-image training: ``python -m diffjax.training.text_main``.

    python -m diffjax.training.text_main --config configs/scenes_text.py[:variant] --workdir W \
        [--config.training.num_steps=3000 ...]

Trains (or resumes, on an existing workdir) and prints the last metrics. Sample the result with
``python -m diffjax sample --workdir W --prompt "a 3 to the left of a 5" --guidance 4 --out S.npz``.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffjax.config_files import apply_overrides, load_config
from diffjax.training.text_builders import is_text_config
from diffjax.training.text_loop import train_text_to_image


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m diffjax.training.text_main", description=__doc__)
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
    if not is_text_config(config):
      raise ValueError(f"--config {args.config!r} is not a text-to-image config (it has no 'text' section)")
    last = train_text_to_image(config, args.workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in last.items()}))
  return 0


if __name__ == "__main__":
  from diffjax.host_memory import reexec_with_tuned_malloc

  reexec_with_tuned_malloc()  # one malloc heap for XLA's threads (diffjax.host_memory)
  sys.exit(main())
