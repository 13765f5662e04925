"""Partition specs of quantized kernels: every leaf is split the way the float kernel's axes are.

Blocks run along the kernel's input axis, so a ``QuantizedArray`` in the rows layout keeps the
``(out, in)`` grid in its codes and first-level statistics: a kernel spec ``(*lead, in_spec, out_spec)``
gives them ``(*lead, out_spec, in_spec)``. A mesh may split the input axis only into parts that hold
whole blocks, so a packed byte is never split between devices and every statistic lives with its block.
The second-level statistics of double quantization (one float32 per 256 blocks, and the offset) are
replicated apart from the leading axes: they are 1/16384 of the kernel. A flat-layout kernel (``in``
not a multiple of the block size) has blocks straddling rows and can be split along its leading axes only.
"""

import dataclasses
import math
from typing import Any

from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError
from jlora.quant._quantized import Quantized


def partition_specs(leaf: Quantized, kernel_spec: Any, mesh: Any = None) -> Quantized:
  """The ``PartitionSpec`` of each leaf of a quantized kernel, derived from the float kernel's spec.

  Args:
    leaf: a quantized kernel (arrays or ``jax.ShapeDtypeStruct`` leaves).
    kernel_spec: the spec the float kernel would have: ``P()`` (replicated) or one entry per axis.
    mesh: if given, also checked: each device must hold whole blocks.

  Returns:
    ``leaf``'s type holding a ``PartitionSpec`` per leaf (a tree prefix for ``jax.jit`` shardings,
    ``jlora.sharding.named``, ``jax.device_put``).

  Raises:
    JloraError: a spec of the wrong length, a split of a flat-layout kernel's matrix axes, or (with
      ``mesh``) an input-axis split into parts that are not whole blocks.

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import quant
    >>> q = quant.quantize_array(jnp.ones((2, 128, 32)), "nf4")   # 2 stacked layers, in 128, out 32
    >>> specs = quant.partition_specs(q, P(None, "fsdp", "tensor"))
    >>> specs.codes, specs.absmax, specs.absmax_scale, specs.absmax_offset
    (P(None, 'tensor', 'fsdp'), P(None, 'tensor', 'fsdp'), P(None, None), P(None,))
  """
  specs = leaf.leaf_specs(kernel_spec)
  if mesh is not None:
    _check_whole_blocks(leaf, kernel_spec, mesh)
  return specs


def kernel_spec(specs: Quantized) -> P:
  """The float kernel's spec back from ``partition_specs``' result."""
  return specs.kernel_spec()


def _entries(leaf, kernel_spec: Any) -> tuple | None:
  entries = tuple(kernel_spec)
  if not entries:
    return None
  n_lead = len(leaf.shape) - 2
  if len(entries) != n_lead + 2:
    raise JloraError(f"The spec {P(*entries)} has {len(entries)} entries, but the quantized kernel of shape "
                     f"{tuple(leaf.shape)} has {n_lead + 2} axes (P() replicates).")
  return entries


def array_leaf_specs(q, kernel_spec: Any):
  """``QuantizedArray.leaf_specs``."""
  entries = _entries(q, kernel_spec)
  double = q.absmax_scale is not None
  if entries is None:
    grid = P()
    return dataclasses.replace(q, codes=grid, absmax=grid, absmax_scale=grid if double else None,
                               absmax_offset=grid if double else None)
  *lead, in_spec, out_spec = entries
  if q.rows:
    grid = P(*lead, out_spec, in_spec)
  elif in_spec is not None or out_spec is not None:
    raise JloraError(f"The quantized kernel {tuple(q.shape)} has input size {q.kernel_shape[0]}, not a multiple of "
                     f"its block size {q.block_size}, so its blocks straddle rows and a mesh can split only its "
                     f"leading axes; the spec {P(*entries)} splits a matrix axis. Replicate those axes (None) or "
                     "quantize with a block size that divides the input size.")
  else:
    grid = P(*lead, None)
  return dataclasses.replace(q, codes=grid, absmax=grid, absmax_scale=P(*lead, None) if double else None,
                             absmax_offset=P(*lead) if double else None)


def array_kernel_spec(specs) -> P:
  """``QuantizedArray.kernel_spec``."""
  codes = tuple(specs.codes)
  if not codes:
    return P()
  if specs.rows:
    *lead, out_spec, in_spec = codes
    return P(*lead, in_spec, out_spec)
  return P(*codes[:-1], None, None)


def _check_whole_blocks(leaf, kernel_spec: Any, mesh: Any) -> None:
  entries = _entries(leaf, kernel_spec)
  if entries is None or not getattr(leaf, "rows", False):
    return
  in_spec = entries[-2]
  axes = () if in_spec is None else (in_spec,) if isinstance(in_spec, str) else tuple(in_spec)
  parts = math.prod(dict(mesh.shape).get(axis, 1) for axis in axes)
  n_in, block = leaf.kernel_shape[0], leaf.block_size
  if (n_in // block) % parts:
    raise JloraError(f"The spec {P(*entries)} splits the input axis (size {n_in}) of a quantized kernel into {parts} "
                     f"parts, which do not hold whole blocks of {block}: every device must hold whole blocks (a "
                     "packed byte or a block's statistic is never split). Split that axis over fewer devices.")
