"""What the sample-quality experiments share: a trained work directory, a judge, batched timed sampling.

``ddim_steps.py``, ``cfg_sweep.py`` and ``distillation.py`` all restore a trained class-conditional model,
draw the same balanced labels and initial noise for every setting they compare (paired comparisons), and
score the images with one :class:`diffjax.eval.SampleScorer` whose real-image features are computed once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffjax.checkpoints import saved_steps
from diffjax.data import load_dataset, to_uint8
from diffjax.eval import load_judge
from diffjax.eval.metrics import SampleScorer
from diffjax.training import builders
from diffjax.training.restore import load_trained
from diffjax.training.workdir import read_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class TrainedRun:
  """A restored model: its config, module, schedule, EMA parameters and image shape."""

  workdir: str
  config: Any
  model: Any
  schedule: Any
  params: Any
  image_shape: tuple[int, int, int]
  step: int | None = None  # training step of the restored checkpoint

  @property
  def num_classes(self) -> int:
    return int(self.model.num_classes)


def load_run(workdir: str) -> TrainedRun:
  """Restores the latest EMA parameters of a class-conditional model trained in ``workdir``.

  The step is fixed before restoring (a run that is still training may save a newer checkpoint
  meanwhile) and kept in ``TrainedRun.step``, so cached rows of an older checkpoint are never reused.
  """
  config = read_config(workdir)
  steps = saved_steps(workdir)
  step = steps[-1] if steps else None
  model, schedule, params = load_trained(config, workdir, step=step)
  if getattr(model, "num_classes", None) is None:
    raise ValueError(f"workdir {workdir!r} holds an unconditional model; the experiments need class labels")
  return TrainedRun(workdir, config, model, schedule, params, tuple(builders.image_shape(config)), step)


def load_scorer(
  judge_path: str, run: TrainedRun, *, data_path: str | None = None
) -> tuple[SampleScorer, dict]:
  """A scorer on all images of ``run``'s dataset, with a judge that must have been trained on them.

  Args:
    judge_path: ``.safetensors`` file from ``python -m diffjax train-judge``.
    run: the trained model whose data is the reference.
    data_path: overrides the config's ``data.path`` (e.g. the IDX directory on this machine).
  """
  data = run.config.data
  reference = load_dataset(source=data.source, path=data_path or data.get("path"), split=data.split)
  params, info = load_judge(judge_path, expected_fingerprint=reference.fingerprint())
  return SampleScorer(judge_params=params, judge_info=info, reference=reference), info


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """``[num]`` labels cycling through the classes."""
  return (np.arange(num) % num_classes).astype(np.int32)


def sample_timed(generate, params, *, labels: np.ndarray, batch_size: int, seed: int, **kwargs):
  """Samples ``labels`` in batches with ``generate(params, key, labels, **kwargs)``.

  Batch ``i`` uses ``fold_in(key(seed), i)``, so two calls with the same labels, batch size and seed
  start from the same noise. Samplers with a ``num_steps`` argument are compiled (on a one-step call)
  before the clock starts; for the others (DDPM over all T steps) the seconds include compilation.

  Returns:
    (uint8 images ``[N, H, W, C]``, seconds of sampling after compilation).
  """
  key = jax.random.key(seed)
  n = len(labels)
  batch_size = min(batch_size, n)
  if n % batch_size:
    raise ValueError(
      f"the number of labels ({n}) must be a multiple of batch_size={batch_size} (one compile)"
    )
  if "num_steps" in kwargs:  # compile on a one-step call; samplers without a step count include it
    jax.block_until_ready(generate(params, key, labels[:batch_size], **{**kwargs, "num_steps": 1}))
  out, t0 = [], time.perf_counter()
  for i, start in enumerate(range(0, n, batch_size)):
    out.append(
      jax.device_get(
        generate(params, jax.random.fold_in(key, i), labels[start : start + batch_size], **kwargs)
      )
    )
  seconds = time.perf_counter() - t0
  return to_uint8(np.concatenate(out)), seconds


def machine() -> str:
  """A short description of where the experiment ran."""
  return (
    f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  )


def write_results(name: str, result: dict, markdown: str) -> None:
  """Writes ``experiments/results/<name>.json`` (strict JSON) and ``<name>.md``."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2, allow_nan=False)
    f.write("\n")
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(markdown)
  print(markdown)


class RowCache:
  """Rows of a sweep saved after each one, so a stopped experiment restarts where it stopped.

  Kept in ``runs/partial/<name>.json`` together with the settings that produced them; rows are reused
  only when the settings are identical (same model, judge, sample count, seed, ...).
  """

  def __init__(self, name: str, settings: dict):
    self.path = os.path.join("runs", "partial", f"{name}.json")
    self.settings = json.loads(json.dumps(settings))
    self.rows: dict[str, dict] = {}
    if os.path.isfile(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      if saved.get("settings") == self.settings:
        self.rows = saved["rows"]
        print(f"reusing {len(self.rows)} finished rows from {self.path}", flush=True)

  def get(self, key: str) -> dict | None:
    return self.rows.get(key)

  def put(self, key: str, row: dict) -> None:
    self.rows[key] = row
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"settings": self.settings, "rows": self.rows}, f, allow_nan=False)
    os.replace(tmp, self.path)
