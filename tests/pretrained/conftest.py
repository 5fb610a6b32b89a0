"""One tiny random-init Stable-Diffusion pipeline per test session, built with torch and saved to disk."""

import os

import pytest

from tests.pretrained.tiny_sd import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
  """``(directory, torch_pipeline)``; skipped without torch/diffusers/transformers."""
  for name in ("torch", "diffusers", "transformers"):
    pytest.importorskip(name)
  root = str(tmp_path_factory.mktemp("tiny_sd"))
  pipe = build_tiny_pipeline(root)
  return os.path.join(root, "pipeline"), pipe


@pytest.fixture(scope="session")
def tiny_loaded(tiny_sd):
  """The tiny pipeline imported by diffjax, with its parameters on the device."""
  from diffjax.pretrained.loader import load_pipeline
  from diffjax.pretrained.pipeline import pipeline_params

  sd = load_pipeline(tiny_sd[0])
  return sd, pipeline_params(sd)
