"""Test-wide JAX setup: 8 fake CPU devices, strict rank promotion, one compilation cache per run.

Environment variables must be set before JAX initialises its backends, so this runs at import time of the
test session. Subprocesses the tests start (training jobs, the CLI, multi-process runs) inherit them.

The persistent compilation cache lives in a directory made for this run and removed at its end: a fresh
machine starts cold, but a program that several tests or job subprocesses compile (the same train step,
the same tiny model) is compiled once per run. It changes no result: a cache hit loads the executable
the same compilation would have produced. Under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``)
the controller imports this file first, so its workers inherit the same directory and only the controller
removes it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="jlora-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # No size limit: one would turn on JAX's file lock, but also an eviction scan that reads every entry's access
  # time file on each write (measured: it made the 2-worker suite I/O-bound). The workers and job subprocesses share
  # the directory unlocked; an entry read half-written fails to load and is compiled again (JAX warns).
else:  # a caller's cache (e.g. a developer's warm one) is used as it is and kept
  _CACHE_DIR = None

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
  if _CACHE_DIR is not None:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
