"""Update norms across several adapters of one base: the adapter whose updates are outsized stands out.

``norm_report`` compares the modules of one adapter with each other, so an adapter whose every module
is scaled up by the same factor looks uniform there. When several adapters meet (combined, or loaded
side by side), each adapter's modules are also compared with the *other* adapters' modules: for the
rows of adapter ``j`` the reference is the median and MAD of ``log(ratio)`` over all rows of the other
adapters (leave-one-out, so with two adapters the larger one is not hidden by the median falling
between them). A row is flagged when its robust z-score against that reference exceeds
``policy.outlier_z`` and its ratio exceeds ``policy.outlier_ratio`` times the reference median; as in
``norm_report``, only upward deviations count.
"""

import math
from collections.abc import Sequence

import numpy as np

from jlora._errors import JloraError
from jlora._safety._norms import _MAD_TO_SIGMA, NormReport, NormRow
from jlora._safety._policy import LoadPolicy


def _log_stats(ratios: np.ndarray) -> tuple[float, float] | None:
  positive = ratios[(ratios > 0) & np.isfinite(ratios)]
  if not positive.size:
    return None
  logs = np.log(positive)
  median = float(np.median(logs))
  return median, float(np.median(np.abs(logs - median)))


def norms_across(reports: Sequence[NormReport], names: Sequence[str], policy: LoadPolicy | None = None) -> NormReport:
  """One table of every adapter's modules, each scored against the other adapters' modules.

  Args:
    reports: one ``NormReport`` per adapter (``jlora.norm_report``), all of the same base.
    names: a name per adapter; rows are named ``"<name>: <module>"``.
    policy: the thresholds ``outlier_z`` and ``outlier_ratio``.

  Returns:
    A ``NormReport`` whose ``ratio_to_median`` and ``robust_z`` are relative to the other adapters, and
    whose ``median_ratio`` / ``mad_log`` summarise all rows. With a single adapter nothing is flagged.

  Example:
    >>> from jlora._safety._norms import NormReport, NormRow
    >>> def report(ratios):
    ...   return NormReport(tuple(NormRow(f"m{i}", r, 1.0, r, 1.0, 0.0, None) for i, r in enumerate(ratios)), 1.0, 0.0)
    >>> across = norms_across([report([0.01, 0.012]), report([1.1, 0.9])], ["a", "b"])
    >>> [row.module for row in across.outliers]
    ['b: m0', 'b: m1']
  """
  policy = policy or LoadPolicy()
  if len(reports) != len(names):
    raise JloraError(f"norms_across: {len(reports)} reports but {len(names)} names.")
  ratios = [np.array([row.ratio for row in report.rows], np.float64) for report in reports]
  rows = []
  for j, (name, report) in enumerate(zip(names, reports)):
    others = np.concatenate([r for i, r in enumerate(ratios) if i != j] or [np.zeros(0)])
    stats = _log_stats(others)
    for row in report.rows:
      z, to_median, flag = 0.0, 0.0, None
      if stats is not None and row.ratio > 0:
        median_log, mad = stats
        if math.isfinite(row.ratio):
          deviation = math.log(row.ratio) - median_log
          z = _MAD_TO_SIGMA * deviation / mad if mad > 0 else (math.inf if deviation > 1e-12 else 0.0)
          to_median = row.ratio / math.exp(median_log)
        else:
          z, to_median = math.inf, math.inf
        if z > policy.outlier_z and to_median > policy.outlier_ratio:
          flag = (f"outlier against the other adapters (z > {policy.outlier_z:g} and > {policy.outlier_ratio:g}x "
                  "their median)")
      rows.append(NormRow(f"{name}: {row.module}", row.update_norm, row.weight_norm, row.ratio, to_median, z, flag))
  stats = _log_stats(np.concatenate(ratios)) if ratios else None
  median, mad = (math.exp(stats[0]), stats[1]) if stats else (0.0, 0.0)
  return NormReport(tuple(rows), median, mad)
