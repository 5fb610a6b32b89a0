"""diffjax's native XLA:CPU kernels: build, load and register them as XLA FFI custom calls.

XLA:CPU is slow on this project's 2-core x86 machine for three parts of the U-Net: convolutions (above
all their weight gradient), GroupNorm and attention (``experiments/profile_train_step.py`` breaks a training step down
by op class). ``diffjax/csrc`` holds C++ custom calls for both:

* ``onednn_conv.cc``: forward, input-gradient and weight-gradient convolution through oneDNN, Intel's
  deep-learning primitives (https://github.com/oneapi-src/oneDNN, which PyTorch's CPU convolutions use),
  used by :mod:`diffjax.onednn_conv` and, as 1x1 convolutions, by the token dense layers' gradients
  (:mod:`diffjax.onednn_dense`);
* ``winograd_conv.cc``: the 3x3 stride-1 "SAME" convolutions (forward and input gradient) by Winograd's
  F(2x2, 3x3) and F(4x4, 3x3), used by :mod:`diffjax.onednn_conv`;
* ``dense.cc``: the token dense layers' and 1x1 convolutions' forward ``x @ w + b``, rows split over
  threads, the bias inside the product (:mod:`diffjax.onednn_dense`, :mod:`diffjax.onednn_conv`);
* ``gemm_kernels.h``: the register-blocked matrix products of ``winograd_conv.cc`` and ``dense.cc``;
* ``group_norm.cc``: GroupNorm (+ SiLU) forward and backward, used by :mod:`diffjax.models.group_norm`;
* ``attention.cc``: multi-head softmax attention forward and (recomputing) backward, used by
  :mod:`diffjax.models.attention_kernels`;
* ``fast_exp.h``: an exp that GCC inlines and vectorises (and a 16-lane AVX-512 one), for the softmax
  and SiLU loops;
* ``workers.h``: the threads both split their batch over (not OpenMP, whose spinning workers would
  compete with XLA's threads and whose runtime PyTorch shares when loaded in the same process); they
  spin for :func:`spin_us` microseconds after a call before they sleep.

This module compiles them with the system C++ compiler (``CXX``, else ``g++``) against oneDNN (the
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` wheels, or ``DIFFJAX_ONEDNN_ROOT`` holding ``lib/``
and ``include/``) and jaxlib's FFI headers, once per source/version, into ``$DIFFJAX_CACHE_DIR``
(default ``~/.cache/diffjax``; written to a temporary file and renamed, so a library is whole or
absent), loads the library and registers its handlers for the CPU platform.

``DIFFJAX_CPU_KERNELS`` selects: ``native`` (the default) uses them where they apply; ``xla`` never.
When unset and the build is not possible (no compiler, no oneDNN), diffjax keeps XLA's kernels and
:func:`unavailable_reason` says why; when ``native`` is set explicitly, tracing raises instead. Each
kernel is chosen per platform inside the computation (``jax.lax.platform_dependent``), so the same
jitted function lowers to XLA's own ops on GPU and TPU. Equality with the XLA versions (forward and
gradients, 1e-5) is tested in ``tests/test_cpu_kernels.py``; speed in ``experiments/bench_unet.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import threading

import jax

__all__ = [
  "ENV_VAR",
  "SPIN_ENV",
  "available",
  "enabled",
  "library_path",
  "setting",
  "spin_us",
  "threads",
  "unavailable_reason",
]

ENV_VAR = "DIFFJAX_CPU_KERNELS"
CHOICES = ("native", "xla")
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("onednn_conv.cc", "winograd_conv.cc", "dense.cc", "group_norm.cc", "attention.cc")
HEADERS = ("workers.h", "fast_exp.h", "gemm_kernels.h")
TARGETS = (
  "DiffjaxOnednnConvFwd",
  "DiffjaxOnednnConvBwdData",
  "DiffjaxOnednnConvBwdWeights",
  "DiffjaxWinogradConv3x3",
  "DiffjaxWinogradWeights",
  "DiffjaxDense",
  "DiffjaxGroupNormFwd",
  "DiffjaxGroupNormBwd",
  "DiffjaxAttentionFwd",
  "DiffjaxAttentionBwd",
)
_lock = threading.Lock()
_state: dict = {}


def _onednn_dirs() -> tuple[str, str]:
  """(lib dir holding libdnnl.so, include dir holding dnnl.hpp), or raises RuntimeError saying why not."""
  root = os.environ.get("DIFFJAX_ONEDNN_ROOT")
  if root:
    lib, inc = os.path.join(root, "lib"), os.path.join(root, "include")
  else:
    try:
      lib = _installed_dir("onednn-cpu-gomp", "libdnnl.so")
      inc = _installed_dir("onednn-devel-cpu-gomp", "dnnl.hpp")
    except importlib.metadata.PackageNotFoundError as e:
      raise RuntimeError(
        f"oneDNN is not installed (pip install onednn-cpu-gomp onednn-devel-cpu-gomp): {e}"
      ) from e
  for path in (os.path.join(lib, "libdnnl.so"), os.path.join(inc, "dnnl.hpp")):
    if not os.path.exists(path):
      raise RuntimeError(f"oneDNN file {path} does not exist")
  return lib, inc


def _installed_dir(dist: str, filename: str) -> str:
  for f in importlib.metadata.files(dist) or ():
    if os.path.basename(str(f)) == filename and "oneapi" not in str(f):
      return os.path.dirname(os.path.abspath(str(importlib.metadata.distribution(dist).locate_file(f))))
  raise RuntimeError(f"the {dist} package has no {filename}")


def _cache_dir() -> str:
  base = os.environ.get("DIFFJAX_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffjax"
  )
  return os.path.join(base, "native")


def _build() -> str:
  """Compiles the custom calls (or finds them compiled) and returns the shared library's path."""
  lib_dir, inc_dir = _onednn_dirs()
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
  source = b""
  for name in SOURCES + HEADERS:
    with open(os.path.join(CSRC, name), "rb") as f:
      source += f.read()
  ffi_dir = jax.ffi.include_dir()
  key = hashlib.sha256(
    b"\0".join(
      [source, jax.__version__.encode(), ffi_dir.encode(), lib_dir.encode(), inc_dir.encode(), cxx.encode()]
    )
  ).hexdigest()[:16]
  out_dir = _cache_dir()
  path = os.path.join(out_dir, f"libdiffjax_cpu_kernels_{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [
    cxx, "-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
    f"-I{ffi_dir}", f"-I{inc_dir}", *(os.path.join(CSRC, s) for s in SOURCES), "-o", tmp,
    f"-L{lib_dir}", "-ldnnl", f"-Wl,-rpath,{lib_dir}",
  ]  # fmt: skip
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {CSRC} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    os.replace(tmp, path)  # whole file or nothing: concurrent builders each rename a complete library
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def _load() -> None:
  """Builds, loads and registers once per process; records the failure reason instead of raising."""
  with _lock:
    if "ok" in _state:
      return
    try:
      path = _build()
      lib = ctypes.CDLL(path)
      for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
      _state.update(ok=True, path=path, reason=None, lib=lib)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
      _state.update(ok=False, path=None, reason=str(e))


def available() -> bool:
  """Whether the native kernels are built and registered in this process (builds on first call)."""
  _load()
  return _state["ok"]


def unavailable_reason() -> str | None:
  """Why :func:`available` is False (None when it is True)."""
  _load()
  return _state["reason"]


def library_path() -> str | None:
  """The compiled library in use (None when unavailable)."""
  _load()
  return _state["path"]


def setting(environ=os.environ) -> str:
  """``DIFFJAX_CPU_KERNELS`` ("native" when unset)."""
  choice = environ.get(ENV_VAR, "native").strip().lower() or "native"
  if choice not in CHOICES:
    raise ValueError(f"{ENV_VAR}={environ.get(ENV_VAR)!r} is not one of {CHOICES}")
  return choice


def enabled(environ=os.environ) -> bool:
  """Whether the native kernels are used: ``DIFFJAX_CPU_KERNELS`` is ``native`` and they build.

  Read when a function is traced: set the variable before a function's first trace.

  Raises:
      RuntimeError: ``DIFFJAX_CPU_KERNELS=native`` was set explicitly but the library cannot be built.
      ValueError: The variable has another value.
  """
  if setting(environ) != "native":
    return False
  spin_us(environ)  # a malformed value fails here, by name, not silently in the library
  if available():
    return True
  if environ.get(ENV_VAR):
    raise RuntimeError(f"{ENV_VAR}=native but diffjax's CPU kernels are unavailable: {unavailable_reason()}")
  return False


def vector_kernels(environ=os.environ) -> bool:
  """Whether the AVX-512 forward kernels of GroupNorm and attention may run: ``DIFFJAX_CPU_AVX512``.

  ``1`` (the default) lets them run where the library was compiled with AVX-512 (``-march=native`` on
  such a CPU) and the shape suits them (GroupNorm: channels a multiple of 16 up to 128; attention: head
  size 8 or 16); ``0`` keeps the portable kernels, which is how the tests check both and
  ``experiments/bench_sampling_kernels.py`` compares them.
  """
  value = environ.get("DIFFJAX_CPU_AVX512", "1").strip()
  if value not in ("0", "1"):
    raise ValueError(f"DIFFJAX_CPU_AVX512={value!r}: expected 0 or 1")
  return value == "1"


SPIN_ENV = "DIFFJAX_CPU_SPIN_US"
DEFAULT_SPIN_US = 200  # csrc/workers.h's kDefaultSpinUs


def spin_us(environ=os.environ) -> int:
  """How long the kernels' worker threads spin for the next call before sleeping: ``DIFFJAX_CPU_SPIN_US``.

  Microseconds, 0 to 100000 (default 200). The library reads the variable at each call. A sampling step
  makes about 90 custom calls with XLA's own ops between them; workers that sleep after each call pay a
  futex wake-up per call. ``experiments/bench_worker_spin.py`` times the setting (0, 50, 200, 1000) on
  bench_unet's sampler and training step.
  """
  value = environ.get(SPIN_ENV, "").strip()
  if not value:
    return DEFAULT_SPIN_US
  if not value.isdigit() or int(value) > 100000:
    raise ValueError(f"{SPIN_ENV}={value!r}: expected microseconds from 0 to 100000")
  return int(value)


def threads(environ=os.environ) -> int:
  """Threads a kernel splits its batch over: ``DIFFJAX_CPU_THREADS``, else the usable cores."""
  value = environ.get("DIFFJAX_CPU_THREADS", "").strip()
  if value:
    if not value.isdigit() or int(value) < 1:
      raise ValueError(f"DIFFJAX_CPU_THREADS={value!r} is not a positive integer")
    return int(value)
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
