"""int8 block quantization: ``round(x * 127 / absmax)`` per block, one int8 per element.

With ``block_size == in`` (one block per output row) this is bitsandbytes' LLM.int8() row-wise
quantization (``int8_vectorwise_quant``) exactly, and dequantization is its ``codes * absmax / 127``
(the float32 reciprocal of 127, multiplied last).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import _blockwise

_INV_127 = np.float32(1.0 / 127.0)


def encode(w_oi: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """``(out, in)`` float32 to ``(int8 codes, absmax)``: ``(out, in)`` and ``(out, in/block)`` in the rows
  layout, ``(n,)`` and ``(n_blocks,)`` in the flat one."""
  n_out, n_in = w_oi.shape
  blocks, _ = _blockwise.to_blocks(w_oi, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  # An all-zero block stores absmax 0 and codes 0 (127 / 0 would make 0 * inf = nan).
  to_code = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  codes = jnp.clip(jnp.round(_blockwise.per_block(blocks, to_code)), -127, 127).astype(jnp.int8)
  if _blockwise.is_rows(n_in, block_size):
    return codes.reshape(n_out, n_in), absmax
  return codes.reshape(-1)[: n_out * n_in], absmax


def decode(codes: jax.Array, absmax: jax.Array, n_out: int, n_in: int, block_size: int) -> jax.Array:
  """``(out, in)`` float32 from ``encode``'s codes and a float32 absmax."""
  values = codes.astype(jnp.float32)
  if _blockwise.is_rows(n_in, block_size):
    blocks = values.reshape(n_out, n_in // block_size, block_size)
  else:
    blocks, _ = _blockwise.flat_blocks(values, block_size)
  return _blockwise.from_blocks(_blockwise.per_block(blocks, absmax) * _INV_127, n_out, n_in)
