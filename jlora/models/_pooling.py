"""Mean pooling of token states into one vector per sequence (sentence-transformers' default)."""

import jax
import jax.numpy as jnp


def mean_pool(hidden_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
  """Average of the hidden states of real tokens: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``.

  This is sentence-transformers' ``pooling_mode_mean_tokens`` (MiniLM sentence embeddings); padding
  tokens (mask 0) do not contribute. Computed in float32.

  Args:
    hidden_btd: token states, shape ``(B, T, D)``.
    attention_mask_bt: 1 for tokens, 0 for padding, shape ``(B, T)``.

  Returns:
    float32 sentence vectors, shape ``(B, D)``.

  Example:
    >>> import jax.numpy as jnp
    >>> hidden = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    >>> mean_pool(hidden, jnp.array([[1, 1, 0]]))
    Array([[2., 3.]], dtype=float32)
  """
  mask_bt1 = attention_mask_bt.astype(jnp.float32)[:, :, None]
  summed_bd = jnp.sum(hidden_btd.astype(jnp.float32) * mask_bt1, axis=1)
  counts_b1 = jnp.maximum(jnp.sum(mask_bt1, axis=1), 1e-9)
  return summed_bd / counts_b1
