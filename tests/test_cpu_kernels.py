"""diffjax.cpu_kernels: builds into a fresh cache, settings, clear errors when unavailable."""

import os

import pytest

from diffjax import cpu_kernels


def test_builds_into_a_fresh_cache_once(tmp_path, monkeypatch):
  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  monkeypatch.setenv("DIFFJAX_CACHE_DIR", str(tmp_path))
  path = cpu_kernels._build()
  assert path.startswith(str(tmp_path)) and os.path.getsize(path) > 0
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary file left
  mtime = os.path.getmtime(path)
  assert cpu_kernels._build() == path and os.path.getmtime(path) == mtime  # cached, not rebuilt


def test_settings_and_thread_count():
  assert cpu_kernels.setting({}) == "native"
  assert cpu_kernels.setting({"DIFFJAX_CPU_KERNELS": "XLA"}) == "xla"
  assert not cpu_kernels.enabled({"DIFFJAX_CPU_KERNELS": "xla"})
  with pytest.raises(ValueError, match="DIFFJAX_CPU_KERNELS"):
    cpu_kernels.setting({"DIFFJAX_CPU_KERNELS": "fast"})
  assert cpu_kernels.threads({"DIFFJAX_CPU_THREADS": "3"}) == 3
  assert cpu_kernels.threads({}) >= 1
  with pytest.raises(ValueError, match="DIFFJAX_CPU_THREADS"):
    cpu_kernels.threads({"DIFFJAX_CPU_THREADS": "0"})
  assert cpu_kernels.vector_kernels({}) and not cpu_kernels.vector_kernels({"DIFFJAX_CPU_AVX512": "0"})
  with pytest.raises(ValueError, match="DIFFJAX_CPU_AVX512"):
    cpu_kernels.vector_kernels({"DIFFJAX_CPU_AVX512": "yes"})


def test_unavailable_library_falls_back_unless_asked_for(tmp_path, monkeypatch):
  monkeypatch.setattr(cpu_kernels, "_state", {})
  monkeypatch.setenv("DIFFJAX_ONEDNN_ROOT", str(tmp_path))  # no lib/ or include/ there
  assert not cpu_kernels.available()
  assert "libdnnl.so" in cpu_kernels.unavailable_reason()
  assert not cpu_kernels.enabled({})  # default: XLA's kernels, silently
  with pytest.raises(RuntimeError, match="DIFFJAX_CPU_KERNELS=native.*libdnnl"):
    cpu_kernels.enabled({"DIFFJAX_CPU_KERNELS": "native"})


def test_missing_compiler_is_reported(tmp_path, monkeypatch):
  monkeypatch.setattr(cpu_kernels, "_state", {})
  monkeypatch.setenv("DIFFJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  if os.environ.get("DIFFJAX_ONEDNN_ROOT"):
    monkeypatch.delenv("DIFFJAX_ONEDNN_ROOT")
  assert not cpu_kernels.available()
  reason = cpu_kernels.unavailable_reason()
  assert "no-such-compiler" in reason or "oneDNN" in reason
