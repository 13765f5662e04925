"""``Quantized``: what every quantized kernel type is to the rest of jlora.

A quantized kernel is a pytree (its codes and statistics are the leaves, its format is static) that
stands in a params tree where a float kernel was. It reports the kernel's ``shape`` and ``dtype`` (so
target discovery, summaries and adapters see the kernel it stands for), dequantizes itself, and knows
how a mesh may split its leaves. ``QuantizedArray`` (NF4, FP4, int8) is one such type; other block
formats (GGUF's) are others. The module-call hook, ``dequantize``, ``merge`` and the sharding rules
work through this interface only.
"""

import abc
from typing import Any

import jax
import jax.numpy as jnp

from jlora._errors import JloraError


class Quantized(abc.ABC):
  """Base of the quantized kernel types. Subclasses are registered pytree dataclasses that provide
  ``shape`` and ``dtype`` (those of the float kernel they stand for) and the methods below."""

  @abc.abstractmethod
  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float kernel, in ``dtype`` (default: the dtype of the kernel that was quantized)."""

  @abc.abstractmethod
  def requantize(self, kernel: jax.Array) -> "Quantized":
    """``kernel`` (same shape) quantized in this leaf's format."""

  @abc.abstractmethod
  def leaf_specs(self, kernel_spec: Any) -> "Quantized":
    """This type with a ``PartitionSpec`` for each leaf, from the float kernel's spec (see ``partition_specs``)."""

  @abc.abstractmethod
  def kernel_spec(self) -> Any:
    """On an instance holding ``PartitionSpec`` leaves (``leaf_specs``' result): the float kernel's spec."""

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    size = 1
    for dim in self.shape:
      size *= dim
    return size

  @property
  def nbytes(self) -> int:
    """Bytes of the stored leaves (codes and statistics)."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(self))

  def astype(self, dtype: Any) -> jax.Array:
    """The dequantized kernel in ``dtype`` (computed in float32, cast once)."""
    return self.dequantize(dtype)

  def __getitem__(self, index: Any) -> jax.Array:
    # flax.nnx modules read their kernel as ``variable[...]``; a quantized kernel answers with its
    # float value, so an nnx module dequantizes its kernel inside its own call.
    if index is not Ellipsis:
      raise JloraError(f"A quantized kernel can only be read whole (kernel[...]), not indexed with {index!r}: "
                       "dequantize it first (jlora.quant.dequantize).")
    return self.dequantize()


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a quantized kernel (a ``jlora.quant.Quantized``)."""
  return isinstance(x, Quantized)
