"""``QuantizedArray``: a kernel in 4-bit (NF4, FP4) or int8 blocks, with optional double quantization.

Layout (bitsandbytes' for a 2-D kernel): the flax kernel ``(in, out)`` is quantized as its transpose,
torch's ``[out, in]`` weight, read row-major in blocks of ``block_size``; leading axes (``nn.scan``
layers, einsum batch axes) are independent matrices, so a scan slices every leaf along the layer axis.

Leaves, with ``lead`` the leading axes and ``rows`` whether ``in`` is a multiple of ``block_size``:

==================  ===========================================  ==========================================
leaf                rows layout                                  flat layout
==================  ===========================================  ==========================================
``codes``           ``lead + (out, in/2)`` uint8 (4-bit, packed)  ``lead + (ceil(n/2),)`` / ``lead + (n,)``
                    ``lead + (out, in)`` int8
``absmax``          ``lead + (out, in/block)``                    ``lead + (n_blocks,)``
                    float32, or uint8 codes with double quantization
``absmax_scale``    ``lead + (ceil(n_blocks/256),)`` float32 (double quantization only, else None)
``absmax_offset``   ``lead`` float32 (double quantization only, else None)
==================  ===========================================  ==========================================
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import JloraError
from jlora.quant import _blockwise, _double, _fourbit, _int8, _specs
from jlora.quant._codebooks import FOUR_BIT
from jlora.quant._quantized import Quantized

KINDS = ("nf4", "fp4", "int8")


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # no elementwise __eq__ over arrays; jax compares the static fields
class QuantizedArray(Quantized):
  """A float kernel stored as block-quantized codes plus per-block statistics.

  Attributes:
    codes: the element codes (see the module docstring for shapes).
    absmax: per-block absmax, float32; with double quantization their uint8 codes.
    absmax_scale: per-256-statistics scale (double quantization), else None.
    absmax_offset: the mean absmax subtracted before double quantization, else None.
    kind: ``"nf4"``, ``"fp4"`` or ``"int8"`` (static).
    block_size: elements per block (static).
    kernel_shape: ``(in, out)``, the trailing two axes of the float kernel (static).
    dtype: the float kernel's dtype, which ``dequantize`` returns by default (static).
  """

  codes: Any
  absmax: Any
  absmax_scale: Any
  absmax_offset: Any
  kind: str = _static()
  block_size: int = _static()
  kernel_shape: tuple[int, int] = _static()
  dtype: np.dtype = _static()

  @property
  def rows(self) -> bool:
    """Whether rows hold whole blocks (codes and statistics keep the ``(out, in)`` grid)."""
    return _blockwise.is_rows(self.kernel_shape[0], self.block_size)

  @property
  def double_quant(self) -> bool:
    return self.absmax_scale is not None

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """Leading (stacked-layer or batch) axes: independent matrices."""
    return tuple(self.codes.shape[: -2 if self.rows else -1])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.lead_shape + tuple(self.kernel_shape)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float kernel ``lead + (in, out)``: ``level(code) * absmax`` in float32, cast once to ``dtype``
    (default: the quantized kernel's dtype)."""
    return _dequantize(self, jnp.dtype(self.dtype if dtype is None else dtype))

  def requantize(self, kernel: jax.Array) -> "QuantizedArray":
    return quantize_array(kernel, self.kind, self.block_size, self.double_quant)

  def leaf_specs(self, kernel_spec: Any) -> "QuantizedArray":
    return _specs.array_leaf_specs(self, kernel_spec)

  def kernel_spec(self) -> Any:
    return _specs.array_kernel_spec(self)


def quantize_array(kernel: jax.Array, kind: str = "nf4", block_size: int = 64,
                   double_quant: bool = True) -> QuantizedArray:
  """Quantizes one float kernel ``lead + (in, out)`` (see ``QuantizedArray`` for the layout).

  Raises:
    JloraError: an unknown kind, a bad block size, a kernel that is not a floating array of rank >= 2,
      or non-finite values (checked whenever the kernel is concrete).
  """
  check_format(kind, block_size)
  shape = tuple(np.shape(kernel))
  dtype = jnp.dtype(getattr(kernel, "dtype", np.float32))
  if len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
    raise JloraError(f"jlora.quant quantizes floating kernels of rank >= 2 (in, out last), got shape {shape} "
                     f"and dtype {dtype}.")
  if min(shape) == 0:
    raise JloraError(f"Cannot quantize an empty kernel of shape {shape}.")
  quantized, finite = _quantize(kernel, kind, block_size, bool(double_quant))
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise JloraError(f"Cannot quantize a kernel of shape {shape} holding NaN or inf.")
  return quantized


def check_format(kind: str, block_size: int) -> None:
  if kind not in KINDS:
    raise JloraError(f"Unknown quantization kind {kind!r}; jlora.quant knows {list(KINDS)}.")
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
    raise JloraError(f"block_size must be a positive int, got {block_size!r}.")
  if kind != "int8" and block_size % 2:
    raise JloraError(f"4-bit kinds pack two codes per byte, so block_size must be even, got {block_size}.")


def _over_lead(fn, n_lead: int):
  for _ in range(n_lead):
    fn = jax.vmap(fn)
  return fn


@jax.jit(static_argnums=(1, 2, 3))
def _encode(kernel: jax.Array, kind: str, block_size: int, double_quant: bool):
  """Codes, float32 absmax, the double-quantization offset (or None) and whether all was finite."""

  def one_matrix(kernel_io):
    w_oi = kernel_io.astype(jnp.float32).T
    if kind == "int8":
      codes, absmax = _int8.encode(w_oi, block_size)
    else:
      codes, absmax = _fourbit.encode(w_oi, block_size, FOUR_BIT[kind])
    return codes, absmax, _double.offset(absmax) if double_quant else None, jnp.all(jnp.isfinite(absmax))

  codes, absmax, offset, finite = _over_lead(one_matrix, kernel.ndim - 2)(kernel)
  return codes, absmax, offset, jnp.all(finite)


@jax.jit(static_argnums=(2,))
def _encode_statistics(absmax: jax.Array, offset: jax.Array, n_lead: int):
  return _over_lead(_double.encode, n_lead)(absmax, offset)


def _quantize(kernel: jax.Array, kind: str, block_size: int, double_quant: bool):
  codes, absmax, offset, finite = _encode(kernel, kind, block_size, double_quant)
  scale = None
  if double_quant:  # a compiled step of its own: see _double.encode
    absmax, scale = _encode_statistics(absmax, offset, kernel.ndim - 2)
  quantized = QuantizedArray(codes, absmax, scale, offset, kind=kind, block_size=block_size,
                             kernel_shape=tuple(kernel.shape[-2:]), dtype=jnp.dtype(kernel.dtype))
  return quantized, finite


@jax.jit(static_argnums=(1,))
def _dequantize(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
  n_in, n_out = q.kernel_shape

  def one_matrix(codes, absmax, scale, offset):
    if scale is not None:
      absmax = _double.decode(absmax, scale, offset)
    if q.kind == "int8":
      w_oi = _int8.decode(codes, absmax, n_out, n_in, q.block_size)
    else:
      w_oi = _fourbit.decode(codes, absmax, n_out, n_in, q.block_size, FOUR_BIT[q.kind])
    return w_oi.T.astype(dtype)

  return _over_lead(one_matrix, len(q.lead_shape))(q.codes, q.absmax, q.absmax_scale, q.absmax_offset)
