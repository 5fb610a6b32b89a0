"""Command line of the KL autoencoder: ``python -m diffjax.training.autoencoder_main``.

    python -m diffjax.training.autoencoder_main --config configs/mnist_autoencoder.py \
        --workdir runs/mnist_autoencoder [--config.training.num_steps=2000 ...]

Trains (or resumes, on an existing workdir) and prints the held-out PSNR and the latent scaling factor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffjax.config_files import apply_overrides, load_config
from diffjax.training.autoencoder_loop import LATENT_STATS_FILE, train_autoencoder


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m diffjax.training.autoencoder_main", description=__doc__)
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
    last = train_autoencoder(config, args.workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  with open(os.path.join(args.workdir, LATENT_STATS_FILE)) as f:
    stats = json.load(f)
  print(json.dumps({"heldout_psnr": last.get("heldout_psnr"), "scaling_factor": stats["scaling_factor"]}))
  return 0


if __name__ == "__main__":
  from diffjax.host_memory import reexec_with_tuned_malloc

  reexec_with_tuned_malloc()  # one malloc heap for XLA's threads (diffjax.host_memory)
  sys.exit(main())
