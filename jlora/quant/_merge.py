"""merge over a quantized base: dequantize, fold the adapter in float32, and either keep the float
kernel (in a chosen dtype) or quantize the merged kernel again and report what that costs."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora.quant._quantized import is_quantized
from jlora.quant._tree import dequantize


@dataclasses.dataclass(frozen=True)
class MergeRow:
  """The requantization error of one merged kernel against the exact (float32) merge."""

  path: str
  params: int
  max_abs_error: float
  mean_abs_error: float


@dataclasses.dataclass(frozen=True)
class MergeReport:
  """Per-kernel and overall error of a requantized merge against the exact float32 merge."""

  rows: tuple[MergeRow, ...]

  @property
  def max_abs_error(self) -> float:
    return max((row.max_abs_error for row in self.rows), default=0.0)

  @property
  def mean_abs_error(self) -> float:
    total = sum(row.params for row in self.rows)
    return sum(row.mean_abs_error * row.params for row in self.rows) / total if total else 0.0

  def __str__(self) -> str:
    width = max([len("kernel")] + [len(row.path) for row in self.rows])
    lines = [f"{'kernel':<{width}}  {'max |err|':>10}  {'mean |err|':>10}"]
    lines += [f"{row.path:<{width}}  {row.max_abs_error:>10.3g}  {row.mean_abs_error:>10.3g}" for row in self.rows]
    lines.append(f"{'all':<{width}}  {self.max_abs_error:>10.3g}  {self.mean_abs_error:>10.3g}")
    return "\n".join(lines)


def merge(lora: Any, params: Mapping, adapters: Mapping, *, dtype: Any = jnp.bfloat16,
          requantize: bool = False) -> Any:
  """Folds adapters into a (partly) quantized base: ``W' = dequantize(W) + s * A @ B`` in float32.

  Args:
    lora: the ``jlora.Lora`` of the adapters (traced: after ``init`` or ``trace``).
    params: the base params; targeted kernels may be quantized or float.
    adapters: the adapter tree.
    dtype: dtype of every kernel that was quantized, merged or not (bfloat16 by default; None keeps each
      kernel's original dtype). Float kernels keep their dtype, as in ``Lora.merge``.
    requantize: quantize each merged kernel again in its own format instead.

  Returns:
    Without ``requantize``: plain params (no quantized leaf left). With it: ``(params, MergeReport)``,
    the merged kernels quantized again (other quantized kernels untouched), and per kernel the max and
    mean absolute error of the requantized merge against the exact float32 merge.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> from jlora import quant
    >>> model = nn.Dense(32, name="proj")
    >>> x = jnp.ones((2, 64))
    >>> qparams = quant.quantize(model.init(jax.random.key(0), x)["params"], "kernel")
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=2))
    >>> adapters = lora.init(jax.random.key(1), qparams, x)
    >>> quant.merge(lora, qparams, adapters)["kernel"].dtype
    dtype(bfloat16)
    >>> requantized, report = quant.merge(lora, qparams, adapters, requantize=True)
    >>> type(requantized["kernel"]).__name__, report.max_abs_error < 0.1
    ('QuantizedArray', True)
  """
  updates, rows = {}, []
  for path, node in lora._adapter_nodes(adapters):
    kernel = _paths.get(params, path)
    exact = _exact_merge(lora, path, kernel, node)
    if not is_quantized(kernel):
      updates[path] = exact.astype(kernel.dtype)
    elif requantize:
      updates[path] = kernel.requantize(exact)
      error = jnp.abs(updates[path].dequantize(jnp.float32) - exact)
      rows.append(MergeRow(_paths.join(path), int(np.prod(exact.shape)), float(jnp.max(error)),
                           float(jnp.mean(error))))
    else:
      updates[path] = exact.astype(kernel.dtype if dtype is None else dtype)
  merged = _paths.replace(params, updates)
  if requantize:
    return merged, MergeReport(tuple(rows))
  return dequantize(merged, dtype)


def _exact_merge(lora: Any, path: tuple[str, ...], kernel: Any, node: Mapping) -> Any:
  """The float32 merge of one kernel, by ``Lora.merge`` itself (float32 in, float32 out)."""
  base = kernel.dequantize(jnp.float32) if is_quantized(kernel) else jnp.asarray(kernel, jnp.float32)
  return _paths.get(lora.merge(_paths.nest({path: base}), _paths.nest({path: node})), path)
