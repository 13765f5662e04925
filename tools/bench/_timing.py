"""Measuring one compiled step: compile time, XLA FLOPs, compiled memory, and side-by-side wall time.

Wall times are taken *interleaved*: every round calls each contender once (in a rotating order) and
blocks on its result, so a change in machine load during the run hits all contenders alike, and a
ratio of two contenders is the median over rounds of their same-round ratio. That matters on a
shared CPU, where a contender timed in a block of its own can be slowed or sped up by whatever else
the machine is doing at that moment. Each call's process CPU time (all threads) is recorded too, as
a cross-check: when other processes take the cores, wall time stretches while CPU time mostly does not.
"""

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call of one contender, one sample per timed round (in round order).

  Attributes:
    samples_s: wall-clock seconds of each round's call.
    cpu_samples_s: process CPU seconds (user + system, all threads) of each round's call.
  """

  samples_s: tuple[float, ...]
  cpu_samples_s: tuple[float, ...]

  @property
  def median_s(self) -> float:
    """Median wall time: the reported figure."""
    return statistics.median(self.samples_s)

  @property
  def rounds(self) -> int:
    return len(self.samples_s)

  @property
  def min_s(self) -> float:
    """Fastest round (the least disturbed by other processes)."""
    return min(self.samples_s)

  @property
  def cpu_median_s(self) -> float:
    """Median process CPU time per call."""
    return statistics.median(self.cpu_samples_s)


def round_ratios(ours: Timing, theirs: Timing, *, cpu: bool = False) -> list[float]:
  """``ours / theirs`` within each round, in round order (wall time, or CPU time with ``cpu``)."""
  a, b = (ours.cpu_samples_s, theirs.cpu_samples_s) if cpu else (ours.samples_s, theirs.samples_s)
  return [x / y for x, y in zip(a, b, strict=True)]


def paired_ratio(ours: Timing, theirs: Timing, *, cpu: bool = False) -> float:
  """Median over rounds of ``ours / theirs`` within the same round.

  Two contenders' calls in one round run seconds apart, so their ratio cancels load that drifts over
  the run (another process starting or ending), which a ratio of two medians would not.
  """
  return statistics.median(round_ratios(ours, theirs, cpu=cpu))


def time_interleaved(contenders: Mapping[str, Callable[[], Any]], *, warmup: int, reps: int, budget_s: float = 0.0,
                     max_reps: int = 25, settle_s: float = 0.05) -> dict[str, Timing]:
  """Times each zero-argument callable once per round, for at least ``reps`` rounds after ``warmup`` rounds.

  Rounds continue past ``reps`` (up to ``max_reps``) until the timed rounds have taken ``budget_s``
  seconds, so fast contenders get more samples than slow ones for the same wall time.

  Each call's result is passed to ``jax.block_until_ready`` inside the timed region, so asynchronous
  dispatch is not mistaken for speed; callables that compute synchronously (torch) may return None.
  Round ``i`` starts at contender ``i mod n`` so none always runs first (right after a cold cache or
  a neighbour's allocation burst).

  Every call is preceded by an untimed pause of ``settle_s``: XLA's and torch's worker threads spin
  for a while after their work ends, and a contender started at once would share the cores with the
  previous one's spinning threads (measured: both XLA and torch steps ~40% slower back to back than
  with a 10 ms pause in between).

  Returns:
    ``{name: Timing}``; compare contenders with :func:`paired_ratio`.
  """
  names = list(contenders)
  for _ in range(warmup):
    for name in names:
      time.sleep(settle_s)
      jax.block_until_ready(contenders[name]())
  samples: dict[str, list[float]] = {name: [] for name in names}
  cpu: dict[str, list[float]] = {name: [] for name in names}
  gc_was_enabled = gc.isenabled()
  gc.disable()  # a collection inside a timed call would be charged to whichever contender it hit
  started = time.perf_counter()
  try:
    i = 0
    while i < reps or (i < max_reps and time.perf_counter() - started < budget_s):
      for name in names[i % len(names):] + names[: i % len(names)]:
        time.sleep(settle_s)
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(contenders[name]())
        samples[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - cpu_start)
      gc.collect()
      i += 1
  finally:
    if gc_was_enabled:
      gc.enable()
  return {name: Timing(tuple(samples[name]), tuple(cpu[name])) for name in names}


@dataclasses.dataclass(frozen=True)
class MemoryFigure:
  """XLA's static memory plan of a compiled program (bytes).

  ``peak_bytes = argument + output - alias + temp``: everything live while the program runs, with
  donated inputs that XLA reuses for outputs (``alias``) counted once. It is what a step needs on the
  device, including the frozen base it reads; generated code is excluded.
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def describe(self) -> str:
    mib = 2**20
    return (f"peak {self.peak_bytes / mib:.1f} MiB = argument {self.argument_bytes / mib:.1f} + output "
            f"{self.output_bytes / mib:.1f} - alias {self.alias_bytes / mib:.1f} + temp {self.temp_bytes / mib:.1f}")


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A compiled program with the cost of producing it and XLA's static analyses.

  Attributes:
    executable: the ``jax.stages.Compiled``; call it with the lowering's arguments.
    trace_lower_s: seconds to trace and lower to StableHLO.
    compile_s: seconds XLA took to compile.
    flops: XLA's FLOP count (``cost_analysis()["flops"]``); a ``while`` (``scan``) body counts once.
    bytes_accessed: XLA's estimate of memory traffic (``cost_analysis()["bytes accessed"]``), same rule.
    memory: XLA's memory plan.
  """

  executable: Any
  trace_lower_s: float
  compile_s: float
  flops: float
  bytes_accessed: float
  memory: MemoryFigure

  @property
  def total_compile_s(self) -> float:
    return self.trace_lower_s + self.compile_s


def compile_step(fn: Callable, *args: Any, donate_argnums: Sequence[int] = ()) -> CompiledStep:
  """``jax.jit(fn).lower(*args).compile()``, timed, with its FLOP count and memory plan.

  ``fn`` should be a fresh function object (not one compiled before) so the figures are those of a
  cold compile; JAX's persistent compilation cache is off unless configured.
  """
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args)
  lowered_at = time.perf_counter()
  executable = lowered.compile()
  compiled_at = time.perf_counter()
  cost = executable.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats = executable.memory_analysis()
  memory = MemoryFigure(
      int(stats.argument_size_in_bytes),
      int(stats.output_size_in_bytes),
      int(stats.alias_size_in_bytes),
      int(stats.temp_size_in_bytes),
  )
  return CompiledStep(executable, lowered_at - start, compiled_at - lowered_at, float(cost["flops"]),
                      float(cost.get("bytes accessed", float("nan"))), memory)


class Stepper:
  """A train step that feeds its own output back in, as a training loop does.

  ``Stepper(executable, state, *frozen)()`` runs ``state = executable(*state, *frozen)`` and returns
  the new state, so donated buffers are reused exactly as in real training.
  """

  def __init__(self, executable: Callable, state: tuple, *frozen: Any):
    self._executable = executable
    self._state = state
    self._frozen = frozen

  def __call__(self) -> tuple:
    self._state = self._executable(*self._state, *self._frozen)
    return self._state
