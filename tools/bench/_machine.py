"""What the benchmark ran on: the JAX device, the CPU, library versions and the load during the run."""

import importlib.metadata
import os
import platform
import threading
import time
from typing import Self

import jax

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft")


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()`` elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def usable_cores() -> int:
  """CPU cores this process may run on (what XLA's CPU thread pool and torch's threads should use)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def device() -> str:
  """The default JAX device in words, e.g. ``"cpu: AMD EPYC (2 cores)"`` or ``"gpu: NVIDIA H100 ..."``."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu: {cpu_model()} ({usable_cores()} cores)"
  return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}"


def versions() -> dict[str, str | None]:
  """Installed versions of Python and the libraries involved; None for an absent one (never imports them)."""
  found: dict[str, str | None] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


class LoadSampler:
  """Samples the 1-minute load average in a background thread while the benchmark runs.

  Use as a context manager; ``summary()`` gives the first, minimum, mean and maximum sample.
  """

  def __init__(self, every_s: float = 5.0):
    self._every_s = every_s
    self._samples: list[float] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self) -> None:
    while True:
      self._samples.append(os.getloadavg()[0])
      if self._stop.wait(self._every_s):
        return

  def __enter__(self) -> Self:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self._samples.append(os.getloadavg()[0])

  def summary(self) -> dict[str, float]:
    samples = self._samples or [os.getloadavg()[0]]
    return {
        "start": samples[0],
        "min": min(samples),
        "mean": sum(samples) / len(samples),
        "max": max(samples),
        "end": samples[-1],
        "samples": len(samples),
        "every_s": self._every_s,
    }


def now_utc() -> str:
  """The current time, ISO 8601 in UTC."""
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
