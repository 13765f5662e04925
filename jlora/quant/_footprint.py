"""footprint: what a params tree with quantized kernels costs, counted on its arrays."""

from typing import Any, NamedTuple

import jax
import numpy as np

from jlora.quant._quantized import is_quantized


class Footprint(NamedTuple):
  """Parameters and bytes of a params tree, quantized kernels apart from the rest.

  Attributes:
    quantized_params: parameters of the quantized kernels (their float shapes).
    quantized_bytes: bytes of their stored leaves (codes and statistics).
    other_params: parameters of every other leaf.
    other_bytes: bytes of every other leaf.
  """

  quantized_params: int
  quantized_bytes: int
  other_params: int
  other_bytes: int

  @property
  def bytes_per_param(self) -> float:
    """Bytes per quantized parameter (0.516 for NF4 with double quantization in blocks of 64)."""
    return self.quantized_bytes / self.quantized_params if self.quantized_params else float("nan")

  @property
  def total_bytes(self) -> int:
    return self.quantized_bytes + self.other_bytes


def _nbytes(leaf: Any) -> int:
  return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def footprint(params: Any) -> Footprint:
  """Counts ``params`` (arrays or ``jax.ShapeDtypeStruct``; quantized kernels count their float size as
  parameters and their codes and statistics as bytes).

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora import quant
    >>> params = {"w": {"kernel": jnp.ones((1024, 256))}, "b": jnp.ones(256)}
    >>> f = quant.footprint(quant.quantize(params, "w/kernel"))
    >>> f.quantized_params, f.quantized_bytes, round(f.bytes_per_param, 4), f.other_bytes
    (262144, 135236, 0.5159, 1024)
  """
  counts = [0, 0, 0, 0]
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    if is_quantized(leaf):
      counts[0] += int(np.prod(leaf.shape))
      counts[1] += sum(_nbytes(x) for x in jax.tree.leaves(leaf))
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      counts[2] += int(np.prod(leaf.shape))
      counts[3] += _nbytes(leaf)
  return Footprint(*counts)
