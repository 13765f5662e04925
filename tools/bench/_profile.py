"""Where a compiled step spends its time: per-HLO-op wall time from a ``jax.profiler`` trace.

Used by ``python -m tools.bench --profile DIR`` to explain a ratio that misses its target. XLA's CPU
runtime records one trace event per executed thunk, tagged with its HLO op name; summing them per op
and looking each op up in ``compiled.as_text()`` says which fusion, dot or copy the time went to, and
the op's JAX name stack says whether it belongs to the forward pass, the backward pass or the update.
Independent thunks may run concurrently, so per-op times can add up to more than the wall time, and
work an op hands to a thread pool (Eigen dots) may be attributed only partly.
"""

import collections
import dataclasses
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.profiler import ProfileData


@dataclasses.dataclass(frozen=True)
class OpTime:
  """Mean wall time per step of one HLO op, with its HLO instruction text (shape, operands)."""

  name: str
  seconds: float
  instruction: str

  @property
  def is_container(self) -> bool:
    """A ``while``/``call``/``conditional``: its time includes the ops it runs, listed separately."""
    return any(f" {kind}(" in self.instruction for kind in ("while", "call", "conditional"))


def phase(op: OpTime) -> str:
  """``forward``, ``backward`` or ``update`` (optimizer, loss scaling: outside the differentiated function)."""
  match = re.search(r'op_name="([^"]*)"', op.instruction)
  name = match.group(1) if match else ""
  if "transpose(jvp(" in name:
    return "backward"
  if "jvp(" in name:
    return "forward"
  return "update"


def kind(op: OpTime) -> str:
  """``matmul`` (YNNPACK/Eigen dots), ``transpose`` (layout copies) or ``elementwise`` (other fusions)."""
  if op.name.startswith("ynn_fusion") or " dot(" in op.instruction or "custom-call(" in op.instruction:
    return "matmul"
  if op.name.startswith(("copy", "transpose")):
    return "transpose"
  return "elementwise"


def _instruction(hlo_text: str, name: str) -> str:
  match = re.search(r"^\s*(?:ROOT )?%?" + re.escape(name) + r" = (.*)$", hlo_text, re.MULTILINE)
  return match.group(1) if match else ""


def op_times(run: Callable[[], Any], hlo_text: str, *, calls: int = 2) -> list[OpTime]:
  """Traces ``calls`` calls of ``run`` (after one untraced call) and returns per-op time, largest first."""
  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        jax.block_until_ready(run())
    xspace = next(Path(trace_dir).rglob("*.xplane.pb"))
    profile = ProfileData.from_file(str(xspace))
  totals: collections.Counter[str] = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        op = dict(event.stats).get("hlo_op")
        if op:
          totals[op] += event.duration_ns * 1e-9 / calls
  return [OpTime(op, seconds, _instruction(hlo_text, op)) for op, seconds in totals.most_common()]


def write_profile(directory: Path, name: str, hlo_text: str, ops: list[OpTime]) -> None:
  """Writes ``{name}.hlo.txt`` (the optimised HLO) and ``{name}.ops.txt`` (time by phase and kind, then every op)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{name}.hlo.txt").write_text(hlo_text)
  leaves = [op for op in ops if not op.is_container]
  total = sum(op.seconds for op in leaves)
  by_group: collections.Counter[tuple[str, str]] = collections.Counter()
  for op in leaves:
    by_group[(phase(op), kind(op))] += op.seconds
  lines = [(f"# {name}: sum of per-op time {total * 1e3:.1f} ms per step (loops excluded: they contain the ops "
            "listed; ops may overlap)"), "# by phase and kind:"]
  lines += [f"#   {p:8s} {k:11s} {seconds * 1e3:9.1f} ms" for (p, k), seconds in sorted(by_group.items())]
  lines += [f"{op.seconds * 1e3:9.2f} ms  {phase(op):8s} {kind(op):11s} {op.name:32s} {op.instruction[:200]}"
            for op in ops]
  (directory / f"{name}.ops.txt").write_text("\n".join(lines) + "\n")
