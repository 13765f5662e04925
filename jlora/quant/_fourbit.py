"""4-bit block quantization (NF4, FP4): codes packed two per byte, float32 absmax per block.

The code of an element is its codebook's nearest level to ``element / absmax`` (ties to the lower level);
of each pair of consecutive codes (row-major over the ``(out, in)`` transpose) the first goes in the high
nibble. That is bitsandbytes' ``quantize_4bit`` layout, byte for byte; dequantization is
``level(code) * absmax`` in float32, as there.
"""

import jax
import jax.numpy as jnp

from jlora.quant import _blockwise
from jlora.quant._codebooks import Codebook


def pack(codes: jax.Array) -> jax.Array:
  """``(..., 2k)`` uint8 codes < 16 into ``(..., k)`` bytes, the first of each pair in the high nibble."""
  pairs = codes.reshape(codes.shape[:-1] + (-1, 2))
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack(packed: jax.Array) -> jax.Array:
  """The inverse of ``pack``."""
  pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
  return pairs.reshape(packed.shape[:-1] + (-1,))


def encode(w_oi: jax.Array, block_size: int, book: Codebook) -> tuple[jax.Array, jax.Array]:
  """``(out, in)`` float32 to ``(packed codes, absmax)``: ``(out, in/2)`` and ``(out, in/block)`` in the rows
  layout, ``(ceil(n/2),)`` and ``(n_blocks,)`` in the flat one."""
  n_out, n_in = w_oi.shape
  blocks, short_tail = _blockwise.to_blocks(w_oi, block_size)
  scaled, absmax = _blockwise.scale_blocks(blocks, short_tail)
  codes = book.nearest(scaled)
  if _blockwise.is_rows(n_in, block_size):
    return pack(codes.reshape(n_out, n_in)), absmax
  n = n_out * n_in
  # An odd count is padded with the code of 0.0 (the padding inside the last block is zeros).
  return pack(codes.reshape(-1)[: n + n % 2]), absmax


def decode(codes: jax.Array, absmax: jax.Array, n_out: int, n_in: int, block_size: int,
           book: Codebook) -> jax.Array:
  """``(out, in)`` float32 from ``encode``'s packed codes and a float32 absmax."""
  values = book.value(unpack(codes))
  if _blockwise.is_rows(n_in, block_size):
    blocks = values.reshape(n_out, n_in // block_size, block_size)
  else:
    blocks, _ = _blockwise.flat_blocks(values[: n_out * n_in], block_size)
  return _blockwise.from_blocks(_blockwise.per_block(blocks, absmax), n_out, n_in)
