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
  assert cpu_kernels.spin_us({}) == cpu_kernels.DEFAULT_SPIN_US
  assert cpu_kernels.spin_us({"DIFFJAX_CPU_SPIN_US": "0"}) == 0
  for bad in ("-1", "2.5", "100001", "fast"):
    with pytest.raises(ValueError, match="DIFFJAX_CPU_SPIN_US"):
      cpu_kernels.spin_us({"DIFFJAX_CPU_SPIN_US": bad})
  with pytest.raises(ValueError, match="DIFFJAX_CPU_SPIN_US"):
    cpu_kernels.enabled({"DIFFJAX_CPU_SPIN_US": "soon"})


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


@pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")
def test_worker_spin_setting_changes_no_result(monkeypatch):
  """The library reads DIFFJAX_CPU_SPIN_US at each call; workers that sleep (0) or spin long agree."""
  import jax
  import numpy as np

  from diffjax.onednn_conv import conv_general_dilated

  x = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32)) / 12.0
  f = jax.jit(
    lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  )
  want = np.asarray(f(x, w))
  for us in ("0", "2000", "0"):
    monkeypatch.setenv(cpu_kernels.SPIN_ENV, us)
    for _ in range(10):  # workers sleep between these calls at 0, stay awake at 2000
      np.testing.assert_array_equal(np.asarray(f(x, w)), want)
