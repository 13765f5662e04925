"""Blocks and their absmax: how a matrix is cut into blocks, and each block scaled into [-1, 1].

A kernel ``(in, out)`` is stored as its transpose ``(out, in)`` (torch's ``[out, in]`` weight), read
row-major in blocks of ``block_size``, so blocks run along the input axis. When ``in`` is a multiple of
``block_size`` every row holds whole blocks and codes and statistics keep the ``(out, in / block)``
grid ("rows" layout, which a mesh can split along both axes); otherwise blocks straddle rows and the
matrix is one flat run of blocks, the last one possibly short ("flat" layout).

The scaling follows bitsandbytes' reference arithmetic exactly: a full block is multiplied by the
float32 reciprocal of its absmax, a short last block is divided by its absmax, and a short last block
of zeros stores bitsandbytes' absmax floor, 1e-38.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_FLOOR = 1e-38


def is_rows(in_features: int, block_size: int) -> bool:
  """Whether an ``(in, out)`` kernel's rows hold whole blocks (the "rows" layout)."""
  return in_features % block_size == 0


def n_blocks(n: int, block_size: int) -> int:
  return math.ceil(n / block_size)


def to_blocks(w_oi: jax.Array, block_size: int) -> tuple[jax.Array, bool]:
  """``(out, in)`` as blocks: ``(out, in / block, block)`` in the rows layout, else ``(n_blocks, block)``
  zero-padded. Returns the blocks and whether the last block is short."""
  n_out, n_in = w_oi.shape
  if is_rows(n_in, block_size):
    return w_oi.reshape(n_out, n_in // block_size, block_size), False
  return flat_blocks(w_oi.reshape(-1), block_size)


def flat_blocks(x: jax.Array, block_size: int) -> tuple[jax.Array, bool]:
  """A 1-D array as zero-padded ``(n_blocks, block)``, and whether the last block is short."""
  n = x.shape[0]
  total = n_blocks(n, block_size) * block_size
  return jnp.pad(x, (0, total - n)).reshape(-1, block_size), total != n


def from_blocks(blocks: jax.Array, n_out: int, n_in: int) -> jax.Array:
  """The inverse of ``to_blocks``: ``(out, in)`` from either layout (padding dropped)."""
  return blocks.reshape(-1)[: n_out * n_in].reshape(n_out, n_in)


def scale_blocks(blocks: jax.Array, short_tail: bool) -> tuple[jax.Array, jax.Array]:
  """Each block divided by its absmax and clamped to [-1, 1]; returns ``(scaled, absmax)``.

  ``blocks`` is ``(..., block)``; a short tail is the last block of a flat ``(n_blocks, block)``. An
  all-zero block scales to zeros and stores absmax 0 (the floor, 1e-38, if it is a short tail), written
  with selects rather than arithmetic so that platforms that flush subnormals compute the same.
  """
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  nonzero = absmax > 0
  safe = jnp.where(nonzero, absmax, 1.0)
  scaled = blocks * (1.0 / safe)[..., None]
  if short_tail:
    last = jnp.arange(blocks.shape[0]) == blocks.shape[0] - 1
    scaled = jnp.where(last[:, None], blocks / safe[:, None], scaled)
    absmax = jnp.where(last & ~nonzero, np.float32(_FLOOR), absmax)
  return jnp.clip(scaled, -1.0, 1.0), absmax


def per_block(values: jax.Array, stats: jax.Array) -> jax.Array:
  """``values (..., block) * stats (...)``, one statistic per block."""
  return values * stats[..., None]
