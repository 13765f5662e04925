"""``GgufBlocks``: a kernel kept in GGUF's own Q4_0, Q4_1 or Q8_0 blocks (llama.cpp's formats).

A GGUF weight is torch's ``[out, in]`` matrix, each row cut into blocks of 32 along the input axis; a
block stores a float16 scale ``d`` (Q4_1 also a float16 minimum ``m``) and 32 codes. The element value is

* Q4_0: ``d * (q - 8)``, ``q`` 4 bits;
* Q4_1: ``d * q + m``, ``q`` 4 bits;
* Q8_0: ``d * q``, ``q`` a signed byte.

Of a 4-bit block's 16 bytes, byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in
its high nibble. ``GgufBlocks`` keeps the file's bytes as arrays on the ``(out, in / 32)`` block grid, so
a mesh splits them along either axis in whole blocks; leading axes (``nn.scan`` layers) are independent
matrices. Dequantization is computed in float32 exactly as the ``gguf`` package computes it: every product
``d * q`` is exact in float32 (11 significant bits times at most 8), so the only rounding is Q4_1's final
``+ m``, and the result is bit for bit ``gguf.quants.dequantize``'s on any platform, fused or not.

Leaves, with ``lead`` the leading axes and ``nb = in / 32``:

==========  ========================================================================================
leaf        shape and dtype
==========  ========================================================================================
``codes``   ``lead + (out, nb, 16)`` uint8 (Q4_0, Q4_1: packed nibbles) / ``lead + (out, nb, 32)`` int8
``scales``  ``lead + (out, nb)`` float16 (``d``)
``mins``    ``lead + (out, nb)`` float16 (Q4_1's ``m``), else None
==========  ========================================================================================

Bytes per parameter: Q4_0 18/32 = 0.5625, Q4_1 20/32 = 0.625, Q8_0 34/32 = 1.0625.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError
from jlora.quant._quantized import Quantized

BLOCK = 32
# ggml type -> (bytes of a block in the file, bytes of its codes)
_LAYOUT = {"q4_0": (18, 16), "q4_1": (20, 16), "q8_0": (34, 32)}
GGUF_TYPES = tuple(_LAYOUT)


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # no elementwise __eq__ over arrays; jax compares the static fields
class GgufBlocks(Quantized):
  """A float kernel ``lead + (in, out)`` stored as GGUF Q4_0 / Q4_1 / Q8_0 blocks of its ``[out, in]`` transpose.

  Attributes:
    codes: the blocks' codes (see the module docstring for shapes).
    scales: each block's float16 scale ``d``.
    mins: each block's float16 minimum ``m`` (Q4_1), else None.
    ggml_type: ``"q4_0"``, ``"q4_1"`` or ``"q8_0"`` (static).
    kernel_shape: ``(in, out)``, the trailing two axes of the float kernel (static).
    dtype: the dtype ``dequantize`` returns by default (static).
  """

  codes: Any
  scales: Any
  mins: Any
  ggml_type: str = _static()
  kernel_shape: tuple[int, int] = _static()
  dtype: np.dtype = _static()

  block_size = BLOCK
  rows = True  # every row holds whole blocks (GGUF requires ``in % 32 == 0``)

  @property
  def lead_shape(self) -> tuple[int, ...]:
    """Leading (stacked-layer) axes: independent matrices."""
    return tuple(self.codes.shape[:-3])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.lead_shape + tuple(self.kernel_shape)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float kernel ``lead + (in, out)``, computed in float32 as ``gguf.quants.dequantize`` does and cast
    once to ``dtype`` (default: the kernel's dtype)."""
    return _dequantize(self, jnp.dtype(self.dtype if dtype is None else dtype))

  def requantize(self, kernel: jax.Array) -> "GgufBlocks":
    return quantize_gguf(kernel, self.ggml_type)

  def leaf_specs(self, kernel_spec: Any) -> "GgufBlocks":
    """Codes and statistics split like the ``(out, in)`` block grid; a block (and its bytes) is never split."""
    entries = tuple(kernel_spec)
    if not entries:
      return dataclasses.replace(self, codes=P(), scales=P(), mins=None if self.mins is None else P())
    if len(entries) != len(self.shape):
      raise JloraError(f"The spec {P(*entries)} has {len(entries)} entries, but the quantized kernel of shape "
                       f"{tuple(self.shape)} has {len(self.shape)} axes (P() replicates).")
    *lead, in_spec, out_spec = entries
    grid = P(*lead, out_spec, in_spec)
    return dataclasses.replace(self, codes=P(*grid, None), scales=grid, mins=None if self.mins is None else grid)

  def kernel_spec(self) -> Any:
    codes = tuple(self.codes)
    if not codes:
      return P()
    *lead, out_spec, in_spec, _ = codes
    return P(*lead, in_spec, out_spec)


def _check_type(ggml_type: str) -> None:
  if ggml_type not in GGUF_TYPES:
    raise JloraError(f"jlora.quant keeps GGUF blocks of types {list(GGUF_TYPES)}, not {ggml_type!r}; other types "
                     "are dequantized to float when loaded.")


def gguf_blocks(data: np.ndarray, ggml_type: str, dtype: Any = np.float32) -> GgufBlocks:
  """A ``GgufBlocks`` from one GGUF tensor's bytes, without dequantizing anything.

  Args:
    data: the tensor's bytes as the file stores them: uint8 ``(out, in / 32 * block bytes)``, one row per
      output feature (``gguf.GGUFReader``'s ``tensor.data``).
    ggml_type: ``"q4_0"``, ``"q4_1"`` or ``"q8_0"`` (``tensor.tensor_type.name.lower()``).
    dtype: the dtype ``dequantize`` returns by default.

  Returns:
    The kernel ``(in, out)`` (flax's layout), its leaves numpy arrays.

  Raises:
    JloraError: another type, or bytes that are not whole rows of blocks.
  """
  _check_type(ggml_type)
  block_bytes, code_bytes = _LAYOUT[ggml_type]
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % block_bytes:
    raise JloraError(f"A {ggml_type.upper()} tensor is uint8 rows of {block_bytes}-byte blocks, got {data.dtype} of "
                     f"shape {data.shape}.")
  n_out, n_blocks = data.shape[0], data.shape[1] // block_bytes
  blocks = data.reshape(n_out, n_blocks, block_bytes)
  scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
  mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if ggml_type == "q4_1" else None
  codes = np.ascontiguousarray(blocks[..., block_bytes - code_bytes:])
  if ggml_type == "q8_0":
    codes = codes.view(np.int8)
  return GgufBlocks(codes, scales, mins, ggml_type=ggml_type, kernel_shape=(n_blocks * BLOCK, n_out),
                    dtype=jnp.dtype(dtype))


def quantize_gguf(kernel: jax.Array, ggml_type: str) -> GgufBlocks:
  """Quantizes a float kernel ``lead + (in, out)`` into GGUF blocks as the ``gguf`` package's ``quantize`` does.

  The arithmetic (float32) and rounding are that package's reference quantizers', so the bytes equal
  ``gguf.quants.quantize(kernel.T, type)``'s. ``in`` must be a multiple of 32.

  Raises:
    JloraError: another type, a kernel that is not floating of rank >= 2, ``in % 32 != 0``, or (whenever
      the kernel is concrete) NaN or inf.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora import quant
    >>> q = quant.quantize_gguf(jnp.linspace(-1, 1, 64 * 8).reshape(64, 8), "q4_1")
    >>> q.codes.shape, q.scales.shape, q.shape, quant.footprint({"w": q}).bytes_per_param
    ((8, 2, 16), (8, 2), (64, 8), 0.625)
  """
  _check_type(ggml_type)
  shape = tuple(np.shape(kernel))
  dtype = jnp.dtype(getattr(kernel, "dtype", np.float32))
  if len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
    raise JloraError(f"GGUF blocks quantize floating kernels of rank >= 2 (in, out last), got shape {shape} and "
                     f"dtype {dtype}.")
  if shape[-2] % BLOCK or min(shape) == 0:
    raise JloraError(f"GGUF blocks run along the input axis in blocks of {BLOCK}; the kernel {shape} has input size "
                     f"{shape[-2]}.")
  codes, scales, mins, finite = _encode(kernel, ggml_type)
  if not isinstance(finite, jax.core.Tracer) and not bool(finite):
    raise JloraError(f"Cannot quantize a kernel of shape {shape} holding NaN or inf.")
  return GgufBlocks(codes, scales, mins, ggml_type=ggml_type, kernel_shape=shape[-2:], dtype=dtype)


def _over_lead(fn, n_lead: int):
  for _ in range(n_lead):
    fn = jax.vmap(fn)
  return fn


def _unpack(codes: jax.Array) -> jax.Array:
  """``(..., 16)`` bytes to ``(..., 32)`` 4-bit codes: the low nibbles, then the high ones."""
  return jnp.concatenate([codes & 0x0F, codes >> 4], axis=-1)


def _pack(q: jax.Array) -> jax.Array:
  return q[..., :16] | (q[..., 16:] << 4)


@jax.jit(static_argnums=(1,))
def _dequantize(q: GgufBlocks, dtype: np.dtype) -> jax.Array:
  n_in, n_out = q.kernel_shape

  def one_matrix(codes, scales, mins):
    d = scales.astype(jnp.float32)[..., None]
    if q.ggml_type == "q8_0":
      values = codes.astype(jnp.float32) * d
    elif q.ggml_type == "q4_0":
      values = d * (_unpack(codes).astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
    else:
      values = d * _unpack(codes).astype(jnp.float32) + mins.astype(jnp.float32)[..., None]
    return values.reshape(n_out, n_in).T.astype(dtype)

  return _over_lead(one_matrix, len(q.lead_shape))(q.codes, q.scales, q.mins)


def _reciprocal(d: jax.Array) -> jax.Array:
  return jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, jnp.float32(1), d))


def _divide(x: jax.Array, divisor: int) -> jax.Array:
  """``x / divisor``, correctly rounded: XLA rewrites a division by a broadcast scalar into a multiplication
  by its rounded reciprocal, which the barrier hides it from."""
  return x / jax.lax.optimization_barrier(jnp.full(x.shape, divisor, jnp.float32))


def _thresholds(offset: float) -> np.ndarray:
  """For ``n = 1..15``, the least float32 ``y`` with ``float32(y + offset) >= n``."""
  offset = np.float32(offset)
  out = []
  for n in range(1, 16):
    y = np.float32(n) - offset
    while np.float32(np.nextafter(y, -np.inf) + offset) >= n:
      y = np.nextafter(y, np.float32(-np.inf))
    while np.float32(y + offset) < n:
      y = np.nextafter(y, np.float32(np.inf))
    out.append(y)
  return np.asarray(out, np.float32)


def _truncate_plus(y: jax.Array, offset: float) -> jax.Array:
  """gguf's ``clip(trunc(y + offset), 0, 15)`` for ``y + offset > -1``, as uint8.

  Counted as the thresholds ``y`` reaches rather than computed, because XLA contracts the product ``y``
  and the addition into one fused multiply-add, which rounds once where numpy rounds twice.
  """
  thresholds = _thresholds(offset).reshape((1,) * y.ndim + (-1,))
  return jnp.sum(y[..., None] >= thresholds, axis=-1).astype(jnp.uint8)


def _round_half_away(x: jax.Array) -> jax.Array:
  """gguf's ``np_roundf``: ``sign(x) * (floor(|x|) + floor(2 * frac(|x|)))``."""
  a = jnp.abs(x)
  floored = jnp.floor(a)
  return jnp.sign(x) * (floored + jnp.floor(2 * (a - floored)))


@jax.jit(static_argnums=(1,))
def _encode(kernel: jax.Array, ggml_type: str):
  # Written over all leading axes at once, not vmapped: under vmap the divisor of ``_divide`` would be
  # broadcast again and the division rewritten.
  *lead, n_in, n_out = kernel.shape
  blocks = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2).reshape(*lead, n_out, n_in // BLOCK, BLOCK)
  mins = None
  if ggml_type == "q8_0":
    d = _divide(jnp.max(jnp.abs(blocks), axis=-1, keepdims=True), 127)
    codes = _round_half_away(blocks * _reciprocal(d)).astype(jnp.int8)
  elif ggml_type == "q4_0":
    signed_max = jnp.take_along_axis(blocks, jnp.argmax(jnp.abs(blocks), axis=-1, keepdims=True), axis=-1)
    d = signed_max / jnp.float32(-8)  # an exact reciprocal: the rewrite changes nothing
    codes = _pack(_truncate_plus(blocks * _reciprocal(d), 8.5))
  else:
    low = jnp.min(blocks, axis=-1, keepdims=True)
    d = _divide(jnp.max(blocks, axis=-1, keepdims=True) - low, 15)
    codes = _pack(_truncate_plus((blocks - low) * _reciprocal(d), 0.5))
    mins = low[..., 0].astype(jnp.float16)
  return codes, d[..., 0].astype(jnp.float16), mins, jnp.all(jnp.isfinite(blocks))
