"""Per-module update norms ``||W' - W||_F / ||W||_F`` and their spread: a screen for broken adapters.

``W' - W`` is what merging the adapter would add to the kernel: ``s A@B`` for LoRA, each variant's own
(``jlora.Variant.update_norms``: DoRA's from its column statistics), never formed as a kernel-sized array.

A poisoned, diverged or mis-scaled module shows up as an update that is large relative to its
frozen kernel, or far larger than the other modules' updates. Ratios are compared on a log scale
(they are multiplicative): the robust z-score of module ``m`` is ``0.6745 * (log q_m - median) / MAD``
with the median and median absolute deviation of ``log q`` over modules whose update is non-zero.
A module is flagged when its ratio exceeds ``max_relative_update`` or when both its z-score and its
ratio to the median are high; only upward deviations count (a small update harms nothing).
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._errors import JloraError
from jlora._safety._errors import AdapterNormWarning, UnsafeAdapterError
from jlora._safety._policy import LoadPolicy
from jlora._safety._trees import to_host
from jlora._variant import split_state
from jlora.quant._quantized import is_quantized

_MAD_TO_SIGMA = 0.6745


@dataclasses.dataclass(frozen=True)
class NormRow:
  """One module (one layer of a stacked kernel): its update norm, kernel norm and how unusual it is.

  Attributes:
    module: the kernel path, with ``[i]`` for layer ``i`` of a stacked (``nn.scan``) kernel.
    update_norm: ``||W' - W||_F`` (``||s A@B||_F`` for LoRA).
    weight_norm: ``||W||_F`` of the frozen kernel.
    ratio: ``update_norm / weight_norm``.
    ratio_to_median: ``ratio`` over the median ratio of all modules with a non-zero update.
    robust_z: MAD-based z-score of ``log(ratio)`` (0 for a zero update).
    flag: why the module is flagged, or None.
  """

  module: str
  update_norm: float
  weight_norm: float
  ratio: float
  ratio_to_median: float
  robust_z: float
  flag: str | None


@dataclasses.dataclass(frozen=True)
class NormReport:
  """The per-module norm table and its summary; ``print`` it for a readable table."""

  rows: tuple[NormRow, ...]
  median_ratio: float
  mad_log: float

  @property
  def outliers(self) -> tuple[NormRow, ...]:
    """The flagged rows."""
    return tuple(row for row in self.rows if row.flag)

  def describe_outliers(self) -> str:
    return "; ".join(f"{row.module}: ratio {row.ratio:.3g} ({row.ratio_to_median:.3g}x median, z {row.robust_z:.3g}) "
                     f"- {row.flag}" for row in self.outliers[:8])

  def __str__(self) -> str:
    header = ("module", "|W'-W|", "|W|", "ratio", "x median", "robust z", "flag")
    body = [(r.module, f"{r.update_norm:.4g}", f"{r.weight_norm:.4g}", f"{r.ratio:.4g}", f"{r.ratio_to_median:.3g}",
             f"{r.robust_z:.3g}", r.flag or "") for r in self.rows]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [line.format(*header), line.format(*("-" * w for w in widths))] + [line.format(*row) for row in body]
    lines.append(f"{len(self.rows)} modules, median ratio {self.median_ratio:.4g}, MAD(log ratio) {self.mad_log:.3g}, "
                 f"{len(self.outliers)} flagged")
    return "\n".join(line.rstrip() for line in lines)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _norms(variant, targets: tuple, kernels: list, nodes: list, state) -> tuple[list, list]:
  """``(||W' - W||_F, ||W||_F)`` per stacked layer of every kernel, in one compiled computation (no host gather); a
  quantized kernel (``jlora.quant``) counts as the kernel it dequantizes to."""
  kernels = [w.dequantize(jnp.float32) if is_quantized(w) else jnp.asarray(w, jnp.float32) for w in kernels]
  updates = [variant.update_norms(w, node, t, state).reshape(-1) for w, node, t in zip(kernels, nodes, targets)]
  weights = [jnp.sqrt(jnp.sum(jnp.square(w).reshape(math.prod(t.stack_shape), -1), axis=1))
             for w, t in zip(kernels, targets)]
  return updates, weights


def norm_report(lora, params: Mapping, adapters: Mapping, policy: LoadPolicy | None = None) -> NormReport:
  """Per-module ``||s·A@B||_F / ||W||_F`` with median, MAD-based robust z-scores and flagged outliers.

  Each layer of a stacked kernel is its own module. ``lora`` must have traced its model
  (``lora.init`` / ``lora.trace``), which gives every target's layout, stacking and scale.

  Args:
    lora: a traced ``jlora.Lora``.
    params: the frozen base params.
    adapters: the adapter tree.
    policy: the thresholds (``outlier_z``, ``outlier_ratio``, ``max_relative_update``).

  Returns:
    A ``NormReport``; ``report.outliers`` are the flagged modules.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Sequential([nn.Dense(8, name="a"), nn.Dense(8, name="b")])
    >>> x = jnp.ones((1, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=2.0))
    >>> adapters = jax.tree.map(lambda v: v + 0.01, lora.init(jax.random.key(1), params, x))
    >>> report = jlora.norm_report(lora, params, adapters)
    >>> [row.module for row in report.rows], report.outliers
    (['layers_0/kernel', 'layers_1/kernel'], ())
  """
  policy = policy or LoadPolicy()
  modules, kernels, nodes = [], [], []
  for path, target in lora.targets.items():
    keys = tuple(path.split("/"))
    if not _paths.contains(adapters, keys):
      raise JloraError(f"norm_report: the adapter tree has no adapter for target '{path}'.")
    node = _paths.get(adapters, keys)
    if set(node) != set(lora.variant.leaf_names):
      raise JloraError(f"norm_report: the adapter of '{path}' has keys {sorted(node)}; a {lora.variant.name} adapter "
                       f"has {sorted(lora.variant.leaf_names)}.")
    n_layers = math.prod(target.stack_shape)
    modules += [path] if not target.stack_shape else [f"{path}[{i}]" for i in range(n_layers)]
    kernels.append(_paths.get(params, keys))
    # Adapter leaves are small: on the host they enter the computation replicated, whatever their sharding.
    nodes.append({name: to_host(leaf) for name, leaf in node.items()})
  if not kernels:
    return _summarise(modules, np.zeros(0), np.zeros(0), policy)
  _, state = split_state(params)
  state = (state or {}).get(lora.variant.name)
  updates, weights = jax.device_get(_norms(lora.variant, tuple(lora.targets.values()), kernels, nodes, state))
  updates = np.concatenate([np.asarray(u, np.float64) for u in updates])
  weights = np.concatenate([np.asarray(w, np.float64) for w in weights])
  return _summarise(modules, updates, weights, policy)


def _summarise(modules: list[str], updates: np.ndarray, weights: np.ndarray, policy: LoadPolicy) -> NormReport:
  with np.errstate(divide="ignore", invalid="ignore"):
    ratios = np.where(weights > 0, updates / np.where(weights > 0, weights, 1.0), np.where(updates > 0, np.inf, 0.0))
  positive = ratios[(ratios > 0) & np.isfinite(ratios)]
  if positive.size:
    logs = np.log(positive)
    median_log = float(np.median(logs))
    mad = float(np.median(np.abs(logs - median_log)))
    median = math.exp(median_log)
  else:
    median_log, mad, median = 0.0, 0.0, 0.0
  rows = []
  for module, update, weight, ratio in zip(modules, updates, weights, ratios):
    if ratio > 0 and np.isfinite(ratio):
      deviation = math.log(ratio) - median_log
      z = _MAD_TO_SIGMA * deviation / mad if mad > 0 else (math.inf if deviation > 1e-12 else 0.0)
      to_median = ratio / median
    else:
      z, to_median = (math.inf, math.inf) if ratio > 0 else (0.0, 0.0)
    flag = None
    if ratio > policy.max_relative_update:
      flag = f"update larger than {policy.max_relative_update:g}x the kernel"
    elif z > policy.outlier_z and to_median > policy.outlier_ratio:
      flag = f"outlier (z > {policy.outlier_z:g} and > {policy.outlier_ratio:g}x median)"
    rows.append(NormRow(module, float(update), float(weight), float(ratio), float(to_median), float(z), flag))
  return NormReport(tuple(rows), median, mad)


def enforce_norms(report: NormReport, policy: LoadPolicy, source: str) -> None:
  """Warns (``AdapterNormWarning``) about flagged modules, or raises with ``policy.strict``."""
  if not report.outliers:
    return
  message = (f"Adapter {source}: {len(report.outliers)} of {len(report.rows)} modules have suspicious update norms: "
             f"{report.describe_outliers()}.")
  if policy.strict:
    raise UnsafeAdapterError(message + " Refused (LoadPolicy(strict=True)).")
  warnings.warn(message + " Pass LoadPolicy(strict=True) to refuse such adapters.", AdapterNormWarning, stacklevel=3)
