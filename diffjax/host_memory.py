"""Keep freed host memory in the process heap (glibc ``mallopt``) so large buffers are reused.

XLA:CPU allocates the temporaries of a compiled step (hundreds of MB for a U-Net training step at
batch 64) at every execution and frees them afterwards. glibc serves allocations above its mmap
threshold (at most 32 MiB) with fresh ``mmap`` regions and unmaps them on ``free``, so every step
touches new pages and pays one page fault per 4 KiB; on a busy virtual machine we measured ~290k
faults per 32x32x3 training step. :func:`keep_freed_memory` turns that off: with ``M_MMAP_MAX = 0``
every allocation comes from the heap, and with a large ``M_TRIM_THRESHOLD`` the heap is not shrunk
after a step, so the next step reuses the same, already-mapped pages. This is the standard advice
for CPU deep learning (PyTorch's CPU performance guide suggests jemalloc/tcmalloc for the same
reason) and applies to every library in the process. The price is that the resident set stays at its
peak instead of shrinking between steps.

It is a no-op (returning ``False``) on non-glibc platforms.

``mallopt`` reaches only glibc's main arena. XLA:CPU allocates a step's temporaries on its own
execution threads, which glibc gives secondary arenas; those grow in heaps of at most 64 MiB and
serve anything larger with a fresh ``mmap`` whatever ``M_MMAP_MAX`` says (``sysmalloc``'s fallback),
so the 426 MB temporary buffer of a 28x28 training step is still mapped and faulted in anew each step
(``tests/test_host_memory.py`` checks it for a 256 MB allocation on a new thread). Which arena a thread uses is fixed when glibc
starts, from ``GLIBC_TUNABLES``: :func:`reexec_with_tuned_malloc` restarts the Python process once with
``glibc.malloc.arena_max=1`` (every thread allocates from the main heap) plus the two settings above,
so the entry points that run long CPU jobs (``python -m diffjax``, the benchmarks) call it first.
``DIFFJAX_MALLOC=default`` turns the restart off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = [
  "TUNED_MALLOC_TUNABLES",
  "keep_freed_memory",
  "keep_freed_memory_on_cpu",
  "reexec_with_tuned_malloc",
  "restore_default_malloc",
  "tuned_malloc_env",
]

# One heap for every thread, no mmapped chunks, and freed memory kept (see the module docstring).
TUNED_MALLOC_TUNABLES = (
  ("glibc.malloc.arena_max", "1"),
  ("glibc.malloc.mmap_max", "0"),
  ("glibc.malloc.trim_threshold", str(1 << 40)),
)
_OPT_OUT = "DIFFJAX_MALLOC"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_MAX_INT = 2**31 - 1


def _libc():
  """The process's C library on Linux, else ``None``."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def _mallopt():
  fn = getattr(_libc(), "mallopt", None)  # glibc only (musl has none)
  if fn is not None:
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return fn


def keep_freed_memory(*, trim_threshold_bytes: int = _MAX_INT) -> bool:
  """Serve every allocation from the heap and keep up to ``trim_threshold_bytes`` of freed memory.

  Args:
      trim_threshold_bytes: Free memory at the top of the heap kept for reuse (glibc's
          ``M_TRIM_THRESHOLD``; at most ``2**31 - 1``).

  Returns:
      Whether the settings were applied (``False`` without glibc).

  Raises:
      ValueError: If ``trim_threshold_bytes`` is not in ``[0, 2**31 - 1]``.
  """
  if not 0 <= trim_threshold_bytes <= _MAX_INT:
    raise ValueError(f"trim_threshold_bytes must be in [0, {_MAX_INT}], got {trim_threshold_bytes}")
  mallopt = _mallopt()
  if mallopt is None:
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_bytes)))


def keep_freed_memory_on_cpu() -> bool:
  """:func:`keep_freed_memory` when JAX runs on the CPU backend (what every training loop calls first).

  On accelerators the step's temporaries live in device memory, so the host heap is left alone.
  Measured on the CPU U-Net training step: 1.2-1.4x steps/s (experiments/results/bench_cpu_paths.md).
  """
  import jax  # noqa: PLC0415 (host_memory itself stays importable without initialising a backend)

  return jax.default_backend() == "cpu" and keep_freed_memory()


def restore_default_malloc() -> bool:
  """glibc's default ``M_MMAP_MAX`` and ``M_TRIM_THRESHOLD`` again (for A/B measurements)."""
  mallopt = _mallopt()
  if mallopt is None:
    return False
  return bool(mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)) and bool(
    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
  )


def _is_glibc() -> bool:
  return hasattr(_libc(), "gnu_get_libc_version")


def tuned_malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
  """``environ`` with :data:`TUNED_MALLOC_TUNABLES` merged into ``GLIBC_TUNABLES``, or ``None``.

  ``None`` means nothing is to change: the tunables are already there (settings the user gave for
  the same names win), ``DIFFJAX_MALLOC=default`` opts out, or the C library is not glibc.

  Raises:
      ValueError: If ``DIFFJAX_MALLOC`` is set to something other than ``default`` or ``tuned``.
  """
  mode = environ.get(_OPT_OUT, "tuned")
  if mode not in ("default", "tuned"):
    raise ValueError(f"{_OPT_OUT} must be 'default' or 'tuned', got {mode!r}")
  if mode == "default" or not _is_glibc():
    return None
  given = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
  names = {item.split("=", 1)[0] for item in given}
  missing = [f"{name}={value}" for name, value in TUNED_MALLOC_TUNABLES if name not in names]
  if not missing:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(given + missing))


def reexec_with_tuned_malloc() -> None:
  """Restart this Python process with :func:`tuned_malloc_env` unless it already runs with it.

  Call it first thing in a ``__main__`` (before threads start): it replaces the process with
  ``sys.executable`` and the same ``sys.orig_argv``, so it never returns when it restarts. The child
  finds the tunables set and goes on. Measured by ``experiments/bench_unet.py`` (``--default-malloc``
  for the comparison).
  """
  env = tuned_malloc_env(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
