"""What a run's work directory holds besides checkpoints: config.json and metrics.jsonl."""

from __future__ import annotations

import json
import os

import ml_collections


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, "config.json"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir {workdir!r} has no config.json: was it written by `diffjax train`?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class MetricsLog:
  """Appends one JSON object per line; on resume drops lines from steps after the restored one."""

  def __init__(self, workdir: str, *, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(ln) for ln in f if ln.strip()]
