"""The KV cache: a fixed-size flax ``"cache"`` collection that decoders write keys and values into.

Layout of the collection (the same for every decoder in ``jlora.models``):

* at the decoder's top level, ``cache_index`` (int32 scalar: the next free slot, shared by the batch)
  and ``key_mask`` (bool ``(B, S)``: which slots hold real tokens, so left padding stays masked);
* in every attention layer, ``cached_key`` and ``cached_value`` of shape ``(B, S, K, H)``; with
  ``nn.scan`` they carry a leading layer axis like the params.

``S`` is fixed when the cache is created (:func:`init_cache`), so every decoding step has the same
shapes and compiles once. A model call with ``decode=True`` writes its ``T`` tokens at slots
``cache_index .. cache_index + T - 1`` and attends to every slot written so far.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = Any  # the "cache" collection: a nested dict of arrays


class Slots(NamedTuple):
  """Where the current tokens sit in the (cached) sequence.

  Attributes:
    key_valid_bs: bool ``(B, S)``: which key slots hold real tokens.
    query_slots_t: int ``(T,)``: slot of each current token.
    write_index: int32 scalar: first slot written by this call (0 without a cache).
  """

  key_valid_bs: jax.Array
  query_slots_t: jax.Array
  write_index: jax.Array


def sequence_slots(module: nn.Module, attention_mask_bt: jax.Array, *, decode: bool) -> Slots:
  """Declares/updates the decoder-level cache variables and returns the slots of this call's tokens.

  Without ``decode`` the keys are exactly the current tokens. With ``decode`` the mask of the current
  tokens is written into ``key_mask`` at ``cache_index`` and the index advances by ``T``.

  Args:
    module: the decoder module owning ``cache_index`` and ``key_mask``.
    attention_mask_bt: 1 for real tokens, 0 for padding, shape ``(B, T)``.
    decode: whether to use the KV cache.

  Returns:
    The :class:`Slots` of the current tokens.
  """
  batch, length = attention_mask_bt.shape
  mask_bt = attention_mask_bt.astype(bool)
  if not decode:
    return Slots(mask_bt, jnp.arange(length), jnp.zeros((), jnp.int32))
  key_mask = module.variable("cache", "key_mask", jnp.zeros, (batch, length), bool)
  cache_index = module.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
  write_index = cache_index.value
  key_mask.value = jax.lax.dynamic_update_slice(key_mask.value, mask_bt, (0, write_index))
  cache_index.value = write_index + length
  return Slots(key_mask.value, write_index + jnp.arange(length), write_index)


def default_position_ids(slots: Slots) -> jax.Array:
  """Position ids derived from the mask, as transformers' ``generate`` does: ``cumsum(mask) - 1``.

  Left padding therefore does not shift positions: the first real token of every row has position 0.
  Padding slots get position 0.

  Args:
    slots: from :func:`sequence_slots`.

  Returns:
    int32 position ids of the current tokens, shape ``(B, T)``.
  """
  positions_bs = jnp.cumsum(slots.key_valid_bs.astype(jnp.int32), axis=1) - 1
  return jnp.maximum(jnp.take(positions_bs, slots.query_slots_t, axis=1), 0)


def update_kv(
    module: nn.Module, k_btkh: jax.Array, v_btkh: jax.Array, slots: Slots, *, decode: bool
) -> tuple[jax.Array, jax.Array]:
  """Writes this call's keys/values into the layer's cache and returns all cached keys/values.

  Args:
    module: the attention module owning ``cached_key`` / ``cached_value``.
    k_btkh: keys of the current tokens, shape ``(B, T, K, H)``.
    v_btkh: values of the current tokens, shape ``(B, T, K, H)``.
    slots: from :func:`sequence_slots`.
    decode: whether to use the KV cache.

  Returns:
    ``(k_bskh, v_bskh)``: the current keys/values without a cache, else the whole cache.
  """
  if not decode:
    return k_btkh, v_btkh
  batch, _, num_kv_heads, head_dim = k_btkh.shape
  shape = (batch, slots.key_valid_bs.shape[1], num_kv_heads, head_dim)
  cached_key = module.variable("cache", "cached_key", jnp.zeros, shape, k_btkh.dtype)
  cached_value = module.variable("cache", "cached_value", jnp.zeros, shape, v_btkh.dtype)
  start = (0, slots.write_index, 0, 0)
  cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_btkh.astype(cached_key.value.dtype), start)
  cached_value.value = jax.lax.dynamic_update_slice(
      cached_value.value, v_btkh.astype(cached_value.value.dtype), start
  )
  return cached_key.value, cached_value.value


def init_cache(model: nn.Module, batch_size: int, max_length: int) -> Cache:
  """An empty KV cache for ``batch_size`` sequences of up to ``max_length`` tokens.

  Pass it as the ``"cache"`` collection with ``decode=True`` and ``mutable=["cache"]``:
  ``logits, updated = model.apply({"params": params, "cache": cache}, ids, decode=True,
  mutable=["cache"])``; ``updated["cache"]`` is the cache for the next call. Its arrays have the
  model's compute dtype. Nothing is computed to build it (shapes come from ``jax.eval_shape``).

  Args:
    model: a causal LM of ``jlora.models`` (Llama family or GPT-2).
    batch_size: number of sequences.
    max_length: capacity in tokens (prompt plus generated tokens).

  Returns:
    The ``"cache"`` collection, all zeros.

  Example:
    >>> import jax
    >>> from jlora.models import LlamaConfig, LlamaForCausalLM, init_cache
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    >>> cache = init_cache(model, batch_size=3, max_length=10)
    >>> cache["model"]["layers"]["self_attn"]["cached_key"].shape  # (layers, B, S, K, H)
    (2, 3, 10, 1, 4)
  """
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
