"""Double quantization: the per-block absmax statistics themselves stored in 8 bits.

As in QLoRA / bitsandbytes (``compress_statistics=True``): the mean of a matrix's absmax values is
subtracted (``absmax_offset``), and the centred values are quantized in blocks of 256 to the nearest
level of the signed dynamic 8-bit map, scaled by each block's own absmax (``absmax_scale``, float32).
Dequantized, a statistic is ``level(code) * absmax_scale + absmax_offset`` in float32. Blocks of 64
weights then cost 8 bits plus 32/256 bits of statistics instead of 32: 4.127 bits per weight for NF4.

XLA may compile ``level * scale + offset`` as one fused multiply-add (one rounding where bitsandbytes rounds
twice): a statistic can then differ from bitsandbytes' in its last bit, far inside the 8-bit error, and
within one compiled program every use of a kernel sees the same value.
"""

import jax
import jax.numpy as jnp

from jlora.quant import _blockwise
from jlora.quant._codebooks import DYNAMIC

GROUP_SIZE = 256


def offset(absmax: jax.Array) -> jax.Array:
  """The mean statistic of a matrix, subtracted before quantizing (float32).

  Summed pairwise in a fixed order (halving the zero-padded vector until one value is left), so that it does not
  depend on how ``absmax`` is sharded: ``jnp.mean``'s reduction is partitioned with its input and rounds
  differently per mesh, which changed the stored offset in its last bit, and with it the fingerprint of the
  quantized base, between a one-device and a multi-process run.
  """
  flat = absmax.reshape(-1)
  n = flat.shape[0]
  total = jnp.pad(flat, (0, (1 << max(n - 1, 0).bit_length()) - n))
  while total.shape[0] > 1:
    half = total.shape[0] // 2
    total = total[:half] + total[half:]
  return total[0] / jnp.float32(n)


def encode(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 statistics (any shape) and their ``offset`` to ``(uint8 codes of that shape, absmax_scale)``.

  Called with ``offset`` as an argument of its own compiled function, the centring is one float32
  subtraction of the stored offset: compiled together with the mean, XLA may fuse the mean's division into
  the subtraction (one rounding instead of two) and centre differently from what is stored.
  """
  flat = absmax.reshape(-1)
  blocks, short_tail = _blockwise.flat_blocks(flat - offset, GROUP_SIZE)
  scaled, scale = _blockwise.scale_blocks(blocks, short_tail)
  codes = DYNAMIC.nearest(scaled).reshape(-1)[: flat.shape[0]].reshape(absmax.shape)
  return codes, scale


def decode(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """float32 statistics of ``codes``' shape."""
  n = codes.size
  # The per-statistic scale is built from the (small, replicated) group scales and shaped like the codes,
  # so codes split over a mesh are never reshaped across their shards.
  group_scale = jnp.repeat(scale, GROUP_SIZE, total_repeat_length=scale.shape[0] * GROUP_SIZE)[:n]
  return DYNAMIC.value(codes) * group_scale.reshape(codes.shape) + offset
