"""One tiny random-init Stable-Diffusion pipeline (and ControlNet) per test session, built with torch."""

import os
import types

import pytest

from tests.pretrained.tiny_sd import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
  """``path``/``pipe`` (pipeline directory, torch pipeline), ``controlnet_path``/``controlnet_pipe``.

  Skipped without torch/diffusers/transformers.
  """
  for name in ("torch", "diffusers", "transformers"):
    pytest.importorskip(name)
  root = str(tmp_path_factory.mktemp("tiny_sd"))
  pipe, cn_pipe = build_tiny_pipeline(root)
  return types.SimpleNamespace(
    path=os.path.join(root, "pipeline"),
    pipe=pipe,
    controlnet_path=os.path.join(root, "controlnet"),
    controlnet_pipe=cn_pipe,
  )


@pytest.fixture(scope="session")
def tiny_loaded(tiny_sd):
  """The tiny pipeline imported by diffjax, with its parameters on the device."""
  from diffjax.pretrained.loader import load_pipeline
  from diffjax.pretrained.pipeline import pipeline_params

  sd = load_pipeline(tiny_sd.path)
  return sd, pipeline_params(sd)


@pytest.fixture(scope="session")
def tiny_controlled(tiny_sd):
  """The tiny pipeline with the ControlNet, imported by diffjax, parameters on the device."""
  from diffjax.pretrained.loader import load_pipeline
  from diffjax.pretrained.pipeline import pipeline_params

  sd = load_pipeline(tiny_sd.path, controlnet=tiny_sd.controlnet_path)
  return sd, pipeline_params(sd)
