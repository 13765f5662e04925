"""Activated LoRA (aLoRA): from which token of each row an adapter acts, and how that reaches the adapted modules.

An aLoRA adapter (``LoraConfig(invocation_tokens=[...])``, PEFT's ``alora_invocation_tokens``) acts from the
start of the *last* occurrence of its invocation sequence in a row to the end of the row, and not before;
a row without the sequence gets no adapter at all (PEFT's ``calculate_alora_offsets`` and
``ALoraLinearVariant``). Every token before the invocation is therefore computed by the base model alone,
so a KV cache the base filled for that prefix is exactly the cache the adapter would have filled.

Per model call this module computes, for every row, ``first``: the index (in this call's tokens) of the
first adapted token (``T`` when none is). Adapted modules read it from ``Call.state["first"]`` (single
adapter, ``jlora.variants.ALORA``) or from the bank's call context (``jlora.AdapterBank``).

Across the calls of a cached decode (prefill, then one token per step, then maybe a later turn) the
activation persists in the cache collection under ``CACHE_KEY``: per row, the id of the adapter whose
invocation was seen (0 for a single adapter, the slot for a bank; -1: none). A row whose adapter already
saw its invocation has every new token adapted, as PEFT's ``generate`` does by clipping the offsets it
computed from the prompt to each step's length. The invocation must therefore lie in the tokens the
adapter is called on: a prefix the base model cached earlier is not searched (it was computed without
the adapter, which is only valid up to the invocation).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._errors import JloraError

# The cache-collection entry (beside the model's own) that keeps, per row, the adapter id whose
# invocation was seen: int32 (B,), -1 for none.
CACHE_KEY = "jlora:alora"


def invocation_starts(input_ids: jax.typing.ArrayLike, invocation_tokens: Sequence[int]) -> jax.Array:
  """The start of the last occurrence of ``invocation_tokens`` in each row of ``input_ids`` (-1: absent).

  PEFT's aLoRA offset is ``T - start`` (the number of adapted tokens counted from the end); jlora keeps the
  start itself. jit-able: the search is ``len(invocation_tokens)`` comparisons of the whole ``(B, T)`` array.

  Args:
    input_ids: int token ids ``(B, T)``.
    invocation_tokens: the invocation sequence (non-empty).

  Returns:
    int32 ``(B,)``.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> jlora.invocation_starts(jnp.array([[5, 1, 2, 7, 1, 2, 9], [1, 1, 1, 3, 3, 3, 3]]), [1, 2]).tolist()
    [4, -1]
  """
  tokens = tuple(int(t) for t in invocation_tokens)
  if not tokens:
    raise JloraError("invocation_starts: the invocation sequence is empty.")
  ids = token_ids_array(input_ids)
  batch = ids.shape[0]
  tokens_bl = jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (batch, len(tokens)))
  return starts_per_row(ids, tokens_bl, jnp.full((batch,), len(tokens), jnp.int32))


def token_ids_array(input_ids: Any) -> jax.Array:
  ids = jnp.asarray(input_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise JloraError(f"aLoRA finds its invocation sequence in token ids: the model's first input must be int ids of "
                     f"shape (batch, tokens), got {ids.dtype} {tuple(ids.shape)}.")
  return ids.astype(jnp.int32)


def starts_per_row(ids_bt: jax.Array, tokens_bl: jax.Array, lengths_b: jax.Array) -> jax.Array:
  """``invocation_starts`` with a sequence per row: ``tokens_bl[b, :lengths_b[b]]`` (length 0: never found)."""
  batch, length = ids_bt.shape
  width = tokens_bl.shape[1]
  # Padding past the row's end never matches (token ids are >= 0), so a match cannot run off the end.
  padded = jnp.concatenate([ids_bt, jnp.full((batch, width), -1, jnp.int32)], axis=1)
  lengths = lengths_b[:, None]
  match_bt = jnp.broadcast_to(lengths > 0, (batch, length))
  for k in range(width):
    match_bt &= (k >= lengths) | (padded[:, k:k + length] == tokens_bl[:, k:k + 1])
  return jnp.max(jnp.where(match_bt, jnp.arange(length, dtype=jnp.int32), -1), axis=1)


def first_adapted(starts_b: jax.Array, length: int, seen_b: jax.Array | None, adapter_b: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """``(first, seen')``: the first adapted token of each row in a call of ``length`` tokens, and the new record.

  A row whose ``seen_b`` entry is its adapter (``adapter_b``) is adapted from its first token; otherwise from
  the invocation's start, or not at all (``first = length``) when this call holds no invocation.
  """
  found = starts_b >= 0
  active = jnp.zeros_like(found) if seen_b is None else seen_b == adapter_b
  first = jnp.where(active, 0, jnp.where(found, starts_b, length)).astype(jnp.int32)
  before = jnp.full_like(adapter_b, -1) if seen_b is None else seen_b
  return first, jnp.where(active | found, adapter_b, before).astype(jnp.int32)


def token_mask(first_b: jax.Array, out: jax.Array, where: str) -> jax.Array:
  """Bool, broadcastable against ``out`` (``(B, T, ...)``, or ``(B, F)`` for a single token): adapted tokens."""
  if out.ndim < 2 or out.shape[0] != first_b.shape[0]:
    raise JloraError(f"aLoRA at {where}: the module's output {tuple(out.shape)} does not lead with the batch's "
                     f"{first_b.shape[0]} rows; aLoRA needs outputs shaped (batch, tokens, ...).")
  if out.ndim == 2:
    return (first_b <= 0)[:, None]
  mask_bt = jnp.arange(out.shape[1], dtype=jnp.int32)[None, :] >= first_b[:, None]
  return mask_bt.reshape(mask_bt.shape + (1,) * (out.ndim - 2))


def model_token_ids(args: tuple, kwargs: Mapping) -> jax.Array:
  """The token ids a model call gets: its first positional input, or ``input_ids=``."""
  if args:
    return token_ids_array(args[0])
  if "input_ids" in kwargs:
    return token_ids_array(kwargs["input_ids"])
  raise JloraError("aLoRA finds its invocation sequence in token ids: pass them as the model's first positional "
                   "input or as input_ids=.")


def split_cache(variables: Mapping) -> tuple[dict, jax.Array | None, bool]:
  """``(variables without CACHE_KEY, the per-row record or None, whether a cache collection is present)``."""
  cache = variables.get("cache")
  if cache is None:
    return dict(variables), None, False
  seen = cache.get(CACHE_KEY)
  return {**variables, "cache": {k: v for k, v in cache.items() if k != CACHE_KEY}}, seen, True


def with_cache_record(out: Any, kwargs: Mapping, seen_b: jax.Array) -> Any:
  """Adds the per-row record to the cache a mutable model call returns (``(y, {"cache": ...})``)."""
  if not kwargs.get("mutable") or not isinstance(out, tuple) or len(out) != 2 or "cache" not in out[1]:
    return out
  y, mutated = out
  return y, {**mutated, "cache": {**mutated["cache"], CACHE_KEY: seen_b}}


def run_activated(lora, variables: Mapping, args: tuple, kwargs: Mapping, lora_dropout: bool | None,
                  state: Mapping | None) -> Any:
  """``lora.model.apply(variables, *args, **kwargs)`` for an aLoRA ``lora``: the activation computed from the
  call's token ids (and the cache's record), handed to every adapted module as ``Call.state["first"]``."""
  ids = model_token_ids(args, kwargs)
  batch, length = ids.shape
  tokens = lora.config.invocation_tokens
  starts = starts_per_row(ids, jnp.broadcast_to(jnp.asarray(tokens, jnp.int32), (batch, len(tokens))),
                          jnp.full((batch,), len(tokens), jnp.int32))
  variables, seen, cached = split_cache(variables)
  if seen is not None and seen.shape != (batch,):
    raise JloraError(f"The cache's aLoRA record has shape {tuple(seen.shape)}, the batch has {batch} rows.")
  first, seen = first_adapted(starts, length, seen, jnp.zeros((batch,), jnp.int32))
  call_state = {**(state or {}), lora.variant.name: {"first": first}}
  with lora.intercept(lora_dropout=lora_dropout, state=call_state):
    out = lora.model.apply(variables, *args, **kwargs)
  return with_cache_record(out, kwargs, seen) if cached else out
