"""XLA:CPU settings diffjax chooses for the CPU backend: which library runs the convolutions.

jax 0.10's XLA:CPU hands convolutions to YNNPACK by default. On this project's 2-core x86 machine
XNNPACK's convolution is faster for the U-Net's shapes (``experiments/bench_unet.py`` records the train
and sampling speed against PyTorch with this setting), so on import diffjax appends to ``XLA_FLAGS``::

    --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
    --xla_cpu_experimental_xnn_fusion_type=individual_convolution

The flags only concern the CPU compiler (GPU and TPU ignore ``xla_cpu_*``), so accelerators are
unaffected. XLA reads ``XLA_FLAGS`` when its first backend starts: import diffjax before running any
JAX computation for them to apply (importing it later warns that they do not). They are left alone when ``XLA_FLAGS`` already sets either fusion
type (the user's choice wins) or when ``DIFFJAX_CPU_CONV=xla`` (XLA's own default). Numerical equality
with XLA's default path (forward and gradients) is tested in ``tests/test_xla_cpu.py``.
"""

from __future__ import annotations

import os
import warnings

ENV_VAR = "DIFFJAX_CPU_CONV"
CHOICES = ("xnnpack", "xla")
XNNPACK_CONV_FLAGS = (
  "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
)


def cpu_conv_library(environ=os.environ) -> str:
  """The library asked for by ``DIFFJAX_CPU_CONV`` ("xnnpack" when unset)."""
  choice = environ.get(ENV_VAR, "xnnpack").strip().lower() or "xnnpack"
  if choice not in CHOICES:
    raise ValueError(f"{ENV_VAR}={environ.get(ENV_VAR)!r} is not one of {CHOICES}")
  return choice


def install_cpu_flags(environ=os.environ) -> bool:
  """Appends :data:`XNNPACK_CONV_FLAGS` to ``environ["XLA_FLAGS"]`` unless told not to; True if it did."""
  flags = environ.get("XLA_FLAGS", "")
  if cpu_conv_library(environ) != "xnnpack":
    return False
  if "xla_cpu_experimental_ynn_fusion_type" in flags or "xla_cpu_experimental_xnn_fusion_type" in flags:
    return False
  environ["XLA_FLAGS"] = " ".join([flags.strip(), *XNNPACK_CONV_FLAGS]).strip()
  if environ is os.environ and _backends_started():
    warnings.warn(
      "diffjax was imported after a JAX computation had started the XLA backends, so its XLA:CPU "
      f"convolution flags ({' '.join(XNNPACK_CONV_FLAGS)}) do not apply in this process: import diffjax "
      f"first, or set {ENV_VAR}=xla to keep XLA's default and silence this warning",
      RuntimeWarning,
      stacklevel=2,
    )
  return True


def _backends_started() -> bool:
  """Whether this process already created its XLA backends (and so has read ``XLA_FLAGS``)."""
  try:
    from jax._src import xla_bridge
  except ImportError:  # pragma: no cover - jax not importable: nothing started
    return False
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check is not None else False
