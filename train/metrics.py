"""Metrics a person can plot: one JSON object per line, TensorBoard event files, and a final PNG."""

import json
import math
import os
from collections.abc import Mapping

import jax


def _tensorboard_writer():
  """tensorboardX's ``SummaryWriter``, imported without torch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors as values, which the job never
  passes), and the test extras install it: that import alone costs every job process seconds and hundreds of MiB.
  Where torch is not imported yet, it is hidden for the duration of the import (``import torch`` then raises
  ImportError, which tensorboardX expects); a torch imported earlier is left as it is.
  """
  import sys

  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes ``{"step": s, name: value, ...}`` lines to ``workdir/metrics.jsonl`` and TensorBoard scalars.

  Only process 0 writes; on other processes every method is a no-op. Non-finite values are written
  as JSON ``null`` (JSON has no NaN) and reported as such.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    SummaryWriter = _tensorboard_writer()
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    for name, value in metrics.items():
      value = float(value)
      row[name] = value if math.isfinite(value) else None
      self._tb.add_scalar(name, value, int(step))
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self.active:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, names: tuple[str, ...] = ("train/loss", "eval/loss")) -> str | None:
  """Draws ``names`` against step from metrics.jsonl into ``workdir/curves.png``; returns its path."""
  if jax.process_index() != 0:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(7, 4))
  for name in names:
    points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
    if points:
      ax.plot(*zip(*points), marker="o" if name.startswith("eval") else None, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, "curves.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
