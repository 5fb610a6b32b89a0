"""keep_freed_memory serves large allocations from the heap (glibc ``mallinfo2``), and validates its argument."""

import ctypes
import ctypes.util

import pytest

from diffjax.host_memory import keep_freed_memory, restore_default_malloc


class _MallInfo2(ctypes.Structure):
  _fields_ = [
    (name, ctypes.c_size_t)
    for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
  ] + [("keepcost", ctypes.c_size_t)]


def _mmapped_bytes():
  """Bytes glibc holds in mmapped chunks, or ``None`` without glibc >= 2.33."""
  try:
    fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
  except (OSError, AttributeError):
    return None
  fn.restype = _MallInfo2
  return lambda: fn().hblkhd


def test_large_allocation_comes_from_the_heap_only_when_kept():
  mmapped = _mmapped_bytes()
  if mmapped is None:
    pytest.skip("needs glibc >= 2.33 (mallinfo2)")
  size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
  try:
    assert restore_default_malloc()
    before = mmapped()
    buf = ctypes.create_string_buffer(size)
    assert mmapped() - before >= size  # default: a fresh mmap region
    del buf
    assert keep_freed_memory()
    before = mmapped()
    buf = ctypes.create_string_buffer(size)
    assert mmapped() - before < size  # kept: served from the heap
    del buf
  finally:
    restore_default_malloc()


def test_bad_threshold():
  with pytest.raises(ValueError, match="trim_threshold_bytes"):
    keep_freed_memory(trim_threshold_bytes=-1)
  with pytest.raises(ValueError, match="trim_threshold_bytes"):
    keep_freed_memory(trim_threshold_bytes=2**31)


def test_on_cpu_applies_exactly_on_the_cpu_backend(monkeypatch):
  import jax

  from diffjax import host_memory

  calls = []
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not host_memory.keep_freed_memory_on_cpu() and not calls
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert host_memory.keep_freed_memory_on_cpu() and calls == [1]
