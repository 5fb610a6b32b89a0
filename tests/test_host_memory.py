"""keep_freed_memory and the GLIBC_TUNABLES restart serve large allocations from the heap (glibc ``mallinfo2``).

The allocation checks run in fresh processes: in the test process, memory freed by earlier tests may
already sit in the heap and serve them.
"""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from diffjax.host_memory import keep_freed_memory

# Preamble of the child processes: libc with mallinfo2, whose hblkhd counts bytes in mmapped chunks.
_MALLINFO = """
import ctypes, ctypes.util, os, threading
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
class MI(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI
mmapped = lambda: libc.mallinfo2().hblkhd
"""

_KEEP_THEN_ALLOCATE = """
from diffjax.host_memory import keep_freed_memory, restore_default_malloc
size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
assert restore_default_malloc()
before = mmapped()
buf = ctypes.create_string_buffer(size)
print(mmapped() - before)
del buf
assert keep_freed_memory()
before = mmapped()
buf = ctypes.create_string_buffer(size)
print(mmapped() - before)
"""

_THREAD_ALLOC = """
out = []
def alloc():  # on a new thread, as XLA:CPU allocates a step's temporaries
  p = libc.malloc(256 << 20)
  out.append(mmapped())
  libc.free(ctypes.c_void_p(p))
t = threading.Thread(target=alloc)
t.start()
t.join()
print(os.environ.get("GLIBC_TUNABLES"))
print(out[0])
"""

_RESTART = "from diffjax.host_memory import reexec_with_tuned_malloc\nreexec_with_tuned_malloc()\n"


def _skip_without_mallinfo2():
  try:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2  # noqa: B018
  except (OSError, AttributeError):
    pytest.skip("needs glibc >= 2.33 (mallinfo2)")


def _run(code, env):
  r = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
  )
  assert r.returncode == 0, r.stderr
  return r.stdout.strip().splitlines()


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DIFFJAX_MALLOC")}
  return dict(env, **extra)


def test_large_allocation_comes_from_the_heap_only_when_kept():
  _skip_without_mallinfo2()
  default, kept = (
    int(v) for v in _run(_MALLINFO + _KEEP_THEN_ALLOCATE, _clean_env(DIFFJAX_MALLOC="default"))
  )
  assert default >= 64 << 20  # default: a fresh mmap region
  assert kept < 64 << 20  # kept: served from the heap


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


def test_reexec_sets_tunables_so_thread_allocations_stay_in_the_heap():
  _skip_without_mallinfo2()
  tunables, mmapped = _run(_MALLINFO + _THREAD_ALLOC, _clean_env())
  assert tunables == "None" and int(mmapped) >= 256 << 20  # default: a secondary arena mmaps it
  restarted = _RESTART + _MALLINFO + _THREAD_ALLOC
  tunables, mmapped = _run(restarted, _clean_env(GLIBC_TUNABLES="glibc.malloc.tcache_count=7"))
  assert tunables.split(":")[0] == "glibc.malloc.tcache_count=7"  # the user's settings are kept
  assert "glibc.malloc.arena_max=1" in tunables and "glibc.malloc.mmap_max=0" in tunables
  assert int(mmapped) == 0
  tunables, mmapped = _run(restarted, _clean_env(DIFFJAX_MALLOC="default"))
  assert tunables == "None" and int(mmapped) >= 256 << 20


def test_tuned_malloc_env_merges_and_validates(monkeypatch):
  from diffjax import host_memory

  monkeypatch.setattr(host_memory, "_is_glibc", lambda: True)
  env = host_memory.tuned_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "X": "1"})
  assert env["X"] == "1"
  items = env["GLIBC_TUNABLES"].split(":")
  assert items[0] == "glibc.malloc.arena_max=4" and len(items) == 3  # the user's value wins
  assert host_memory.tuned_malloc_env(env) is None  # already set: no second restart
  assert host_memory.tuned_malloc_env({"DIFFJAX_MALLOC": "default"}) is None
  with pytest.raises(ValueError, match="DIFFJAX_MALLOC"):
    host_memory.tuned_malloc_env({"DIFFJAX_MALLOC": "fast"})
  monkeypatch.setattr(host_memory, "_is_glibc", lambda: False)
  assert host_memory.tuned_malloc_env({}) is None
