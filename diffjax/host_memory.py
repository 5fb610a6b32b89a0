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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "keep_freed_memory_on_cpu", "restore_default_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_MAX_INT = 2**31 - 1


def _mallopt():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  fn = getattr(libc, "mallopt", None)  # glibc only (musl has none)
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
