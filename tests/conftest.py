import os
import sys

# Make `tests.*` helpers and the repo's `configs/` importable however pytest is invoked.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Persistent XLA compilation cache shared by the xdist workers and by the CLI subprocesses the tests
# start (they inherit the environment). Many tests build the same jitted train/sample steps again
# (resume, restore, train-then-sample); with the cache those compile once. Measured on the 2-core CI
# machine: tests/training/test_loop.py::test_resume_continues_the_same_run 120 s -> 77 s from a cold
# cache. Set before jax is imported so every process reads it from the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The suite's models are tiny, so XLA:CPU compile time dominates it; LLVM's optimisation level 0 halves
# that (tests/training/test_loop.py::test_resume_continues_the_same_run: 89.8 -> 44.2 CPU-s) while
# executing the same XLA programs (XLA's own HLO passes are unaffected). Benchmarks and experiments do
# not go through this file and keep the default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after the environment above; a plugin may have imported jax already)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
