"""Masked dot-product attention with grouped-query heads, and the masks decoders and encoders use."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def attention_mask(
    key_valid_bs: jax.Array,
    query_slots_t: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None = None,
) -> jax.Array:
  """Which keys each query may attend to.

  Slots index the sequence (or the KV cache) from 0: query ``t`` sits at slot ``query_slots_t[t]`` and
  key ``s`` at slot ``s``. A key is visible when it is valid (not padding) and, for causal attention,
  ``s <= q`` and, with a sliding window ``w``, ``s > q - w`` (as in transformers).

  Args:
    key_valid_bs: bool, shape ``(B, S)``: which key slots hold real tokens.
    query_slots_t: int, shape ``(T,)``: the slot of each query.
    causal: whether queries may only see keys at or before their own slot.
    sliding_window: optional window size (causal only).

  Returns:
    A bool mask of shape ``(B, T, S)``.

  Example:
    >>> import jax.numpy as jnp
    >>> mask = attention_mask(jnp.array([[False, True, True]]), jnp.arange(3), causal=True)
    >>> mask.astype(int)[0]
    Array([[0, 0, 0],
           [0, 1, 0],
           [0, 1, 1]], dtype=int32)
  """
  key_valid_b1s = key_valid_bs.astype(bool)[:, None, :]
  if not causal:
    return jnp.broadcast_to(key_valid_b1s, (key_valid_bs.shape[0], query_slots_t.shape[0], key_valid_bs.shape[1]))
  key_slots_s = jnp.arange(key_valid_bs.shape[1])
  visible_ts = key_slots_s[None, :] <= query_slots_t[:, None]
  if sliding_window is not None:
    visible_ts &= key_slots_s[None, :] > query_slots_t[:, None] - sliding_window
  return key_valid_b1s & visible_ts[None, :, :]


def dot_product_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array,
    *,
    scale: float,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """``softmax(scale * q @ k^T + mask) @ v`` with grouped-query heads.

  The ``N`` query heads are split into ``K`` groups of ``N // K`` heads that share one key/value
  head (GQA; ``K == N`` is plain multi-head attention). Scores are soft-maxed in float32 and cast
  back to the compute dtype, as transformers' eager attention does. A query row with no visible key
  (left padding) gets uniform weights instead of NaNs.

  Args:
    q_btnh: queries, shape ``(B, T, N, H)``.
    k_bskh: keys, shape ``(B, S, K, H)``.
    v_bskh: values, shape ``(B, S, K, H)``.
    mask_bts: bool, shape ``(B, T, S)``, from :func:`attention_mask`.
    scale: the score scale, usually ``H ** -0.5``.
    dropout: optional function applied to the attention weights (attention dropout).

  Returns:
    The attended values, shape ``(B, T, N, H)``.
  """
  batch, q_len, num_heads, head_dim = q_btnh.shape
  num_kv_heads = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh) * jnp.asarray(scale, q_btnh.dtype)
  scores_bkgts = jnp.where(
      mask_bts[:, None, None, :, :], scores_bkgts.astype(jnp.float32), jnp.finfo(jnp.float32).min
  )
  weights_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
  if dropout is not None:
    weights_bkgts = dropout(weights_bkgts)
  out_btkgh = jnp.einsum("bkgts,bskh->btkgh", weights_bkgts, v_bskh)
  return out_btkgh.reshape(batch, q_len, num_heads, head_dim)
