"""Inverted dropout on the adapter's input, shared by the linen and nnx paths."""

import jax
import jax.numpy as jnp


def inverted_dropout(rng: jax.Array, rate: float, x: jax.Array) -> jax.Array:
  """Zeroes each element with probability ``rate`` and scales the rest by ``1 / (1 - rate)``."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
