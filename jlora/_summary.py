"""A trainable-parameter summary, like PEFT's ``print_trainable_parameters``, returned as data."""

import dataclasses
import math
from collections.abc import Mapping

from jlora import _paths


@dataclasses.dataclass(frozen=True)
class TargetRow:
  """One adapted kernel: where it is, what it is, and what the adapter costs."""

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  rank: int
  scale: float
  params: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable (adapter) vs total (frozen base + adapter) parameter counts, with a per-target table.

  ``trainable`` counts every leaf of the variant (``variant``): DoRA's magnitudes, VeRA's vectors, ...; the
  frozen side includes a variant's shared frozen state.
  """

  trainable: int
  total: int
  rows: tuple[TargetRow, ...]
  variant: str = "lora"

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    header = ("target", "kind", "kernel shape", "rank", "scale", "adapter params")
    body = [(r.path, r.kind, "x".join(map(str, r.kernel_shape)), str(r.rank), f"{r.scale:g}", f"{r.params:,}")
            for r in self.rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in body]
    lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {self.percent:.4f} || variant: {self.variant}")
    return "\n".join(lines)


def _size(leaf) -> int:
  return math.prod(leaf.shape)


def summarize(params: Mapping, adapters: Mapping, targets: Mapping, variant: str = "lora") -> Summary:
  """Counts parameters of ``params`` and ``adapters``; ``targets`` maps kernel paths to Targets."""
  rows = []
  trainable = 0
  for path, target in targets.items():
    node = _paths.get(adapters, tuple(path.split("/")))
    count = sum(_size(leaf) for _, leaf in _paths.iter_leaves(node))
    trainable += count
    kernel = _paths.get(params, tuple(path.split("/")))
    rows.append(TargetRow(path, target.kind, tuple(kernel.shape), target.rank, target.scale, count))
  frozen = sum(_size(leaf) for _, leaf in _paths.iter_leaves(params))
  return Summary(trainable=trainable, total=frozen + trainable, rows=tuple(rows), variant=variant)
