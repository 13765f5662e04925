"""Benchmark results: named figures with optional targets, as JSON and as a printed table.

JSON layout::

    {"suite": ..., "command": ..., "date": ..., "device": ..., "machine": {...}, "versions": {...},
     "results": {NAME: {"value": float | null, "target": float | null, "detail": str}}}

Every target is an upper bound: a figure meets its target when ``value <= target``. A null value
always comes with the reason in ``detail``.
"""

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Result:
  """One figure.

  Attributes:
    value: the measurement (seconds, bytes, a ratio, ...; the name says which), or None when it
      could not be measured.
    target: the upper bound it should meet, or None.
    detail: how it was obtained (the raw figures behind a ratio), or why it is missing.
  """

  value: float | None
  target: float | None = None
  detail: str = ""

  @property
  def met(self) -> bool | None:
    """Whether ``value <= target``; None without a value or a target."""
    if self.value is None or self.target is None:
      return None
    return self.value <= self.target

  def to_json(self) -> dict[str, Any]:
    value = None if self.value is None or not math.isfinite(self.value) else float(self.value)
    return {"value": value, "target": self.target, "detail": self.detail}


@dataclasses.dataclass
class Report:
  """Everything one run measured, plus where and how it ran."""

  suite: str
  command: str
  date: str
  device: str
  machine: dict[str, Any]
  versions: dict[str, str | None]
  results: dict[str, Result] = dataclasses.field(default_factory=dict)

  def add(self, name: str, value: float | None, target: float | None = None, detail: str = "") -> Result:
    """Records a figure under ``name`` (names are unique) and returns it."""
    if name in self.results:
      raise ValueError(f"result {name!r} recorded twice")
    self.results[name] = Result(value, target, detail)
    return self.results[name]

  def to_json(self) -> dict[str, Any]:
    return {
        "suite": self.suite,
        "command": self.command,
        "date": self.date,
        "device": self.device,
        "machine": self.machine,
        "versions": self.versions,
        "results": {name: result.to_json() for name, result in self.results.items()},
    }

  def dumps(self) -> str:
    return json.dumps(self.to_json(), indent=2)


def _value(value: float | None) -> str:
  if value is None:
    return "null"
  if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
    return f"{value:.3e}"
  return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"


def format_table(report: Report, *, detail_width: int = 110) -> str:
  """A plain-text (also valid Markdown) table of every figure: name, value, target, met, detail."""
  rows = [("figure", "value", "target", "met", "detail")]
  for name, result in report.results.items():
    met = {True: "yes", False: "NO", None: ""}[result.met]
    target = "" if result.target is None else f"<= {result.target:g}"
    detail = result.detail if len(result.detail) <= detail_width else result.detail[: detail_width - 3] + "..."
    rows.append((name, _value(result.value), target, met, detail))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = []
  for i, row in enumerate(rows):
    cells = [cell.ljust(widths[j]) if j < 4 else cell for j, cell in enumerate(row)]
    lines.append("| " + " | ".join(cells) + " |")
    if i == 0:
      lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
  return "\n".join(lines)
