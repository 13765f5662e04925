"""The low-rank path of an embedding table ``E: (vocab, features)``, framework-neutral.

Lookup ``E[ids]`` gets ``A[ids] @ B`` (no dropout on an index); the transposed use ``q @ E^T``
(tied output embeddings, ``attend``) gets ``(q @ B^T) @ A^T``, so a merged table serves both.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def embedding_low_rank(attend: bool, x: jax.Array, a: jax.Array, b: jax.Array,
                       dropout: Callable[[jax.Array], jax.Array], dtype) -> jax.Array:
  """``A[x] @ B`` for token ids ``x``, or ``(dropout(x) @ B^T) @ A^T`` for queries ``x`` when ``attend``."""
  a, b = a.astype(dtype), b.astype(dtype)
  if attend:
    return jnp.einsum("...d,rd->...r", dropout(jnp.asarray(x, dtype)), b) @ a.T
  return jnp.take(a, x, axis=0) @ b
