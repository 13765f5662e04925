"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

import jax
import jax.numpy as jnp

from jlora._errors import JloraError


def top_k_filter(logits_bv: jax.Array, k: int) -> jax.Array:
  """Keeps the ``k`` largest logits of each row (ties with the k-th included), sets the rest to -inf.

  Args:
    logits_bv: logits, shape ``(B, V)``.
    k: how many tokens to keep (static).

  Returns:
    Filtered logits, same shape.
  """
  kth_b1 = jax.lax.top_k(logits_bv, k)[0][:, -1:]
  return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def top_p_filter(logits_bv: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches ``top_p``.

  A token is kept when the probability of the strictly more likely tokens is below ``top_p``
  (transformers' ``TopPLogitsWarper``); the most likely token is always kept.

  Args:
    logits_bv: logits, shape ``(B, V)``.
    top_p: the nucleus mass in ``(0, 1]``.

  Returns:
    Filtered logits, same shape, -inf outside the nucleus.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
    >>> jnp.isfinite(top_p_filter(logits, 0.7))
    Array([[False,  True, False,  True]], dtype=bool)
  """
  sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
  probs_bv = jax.nn.softmax(sorted_bv.astype(jnp.float32), axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  keep_bv = mass_before_bv < top_p
  keep_bv = keep_bv.at[:, 0].set(True)
  threshold_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)


def sample_token(
    logits_bv: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
  """The next token of each row: ``argmax`` when ``temperature == 0``, else a filtered sample.

  Sampling draws from ``softmax(logits / temperature)`` after :func:`top_k_filter` and
  :func:`top_p_filter` (in that order, as transformers), in float32.

  Args:
    logits_bv: logits of the last position, shape ``(B, V)``.
    rng: a PRNG key (unused, may be None, when greedy).
    temperature: a Python ``0`` (or ``0.0``) means greedy; otherwise the softmax temperature.
    top_k: keep only the ``k`` most likely tokens, or None.
    top_p: keep only the nucleus of mass ``top_p``, or None.

  Returns:
    int32 token ids, shape ``(B,)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> sample_token(logits, None, temperature=0.0)
    Array([1], dtype=int32)
    >>> sample_token(logits, jax.random.key(0), temperature=1.0, top_k=1)
    Array([1], dtype=int32)
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  if rng is None:
    raise JloraError("sample_token needs an rng when temperature != 0 (pass jax.random.key(seed)).")
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_k is not None:
    logits_bv = top_k_filter(logits_bv, top_k)
  if top_p is not None:
    logits_bv = top_p_filter(logits_bv, top_p)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)
