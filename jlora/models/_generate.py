"""Autoregressive generation with a fixed-size KV cache, compiled once as a single ``while_loop``.

Every model call goes through ``apply_fn`` (``model.apply`` by default), with the cache as an
ordinary flax collection: ``apply_fn({"params": params, "cache": cache}, ids, attention_mask=...,
decode=True, mutable=["cache"])``. A function with ``model.apply``'s signature that rewrites
``variables["params"]`` (e.g. ``jlora.Lora.apply_fn(adapters)``) therefore decodes with adapters
without merging them; ``adapter_ids`` hands a ``jlora.AdapterBank``'s apply function each row's slot, so
one batch decodes with a different adapter per row. A cache returned by one call (``return_cache``)
continues in the next (``cache=``): a conversation run on the base model continues with an activated
LoRA adapter without recomputing its prefix.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import JloraError
from jlora.models._kv_cache import init_cache
from jlora.models._sampling import sample_token

ApplyFn = Callable[..., Any]


@functools.partial(
    jax.jit,
    static_argnames=("model", "apply_fn", "max_new_tokens", "greedy", "top_k", "use_top_p", "eos_ids", "pad_id",
                     "cache_length", "return_cache"),
)
def _generate(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    cache: Any,
    adapter_ids: jax.Array | None,
    *,
    model: nn.Module,
    apply_fn: ApplyFn | None,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
    cache_length: int,
    return_cache: bool,
) -> jax.Array | tuple[jax.Array, Any]:
  apply = model.apply if apply_fn is None else apply_fn
  batch, prompt_length = input_ids.shape
  rows = {} if adapter_ids is None else {"adapter_ids": adapter_ids}

  def forward(cache, ids_bt, mask_bt):
    logits_btv, state = apply(
        {"params": params, "cache": cache}, ids_bt, attention_mask=mask_bt, decode=True, mutable=["cache"], **rows
    )
    return logits_btv[:, -1], state["cache"]

  def choose(logits_bv, key):
    if greedy:
      return sample_token(logits_bv, None, temperature=0)
    return sample_token(
        logits_bv, key, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None
    )

  if cache is None:
    cache = init_cache(model, batch, cache_length)
  logits_bv, cache = forward(cache, input_ids, attention_mask)

  def keep_going(state):
    step, _, _, _, finished_b, _ = state
    return (step < max_new_tokens) & ~jnp.all(finished_b)

  def decode_step(state):
    step, logits_bv, cache, tokens_bn, finished_b, rng = state
    rng, key = jax.random.split(rng)
    token_b = jnp.where(finished_b, pad_id, choose(logits_bv, key))
    tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
    # A row that had finished feeds padding, masked out of the cache (a later turn continues after it).
    fed_b = (~finished_b).astype(jnp.int32)
    finished_b = finished_b | jnp.isin(token_b, jnp.asarray(eos_ids, jnp.int32))
    logits_bv, cache = forward(cache, token_b[:, None], fed_b[:, None])
    return step + 1, logits_bv, cache, tokens_bn, finished_b, rng

  state = (
      jnp.zeros((), jnp.int32),
      logits_bv,
      cache,
      jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((batch,), bool),
      rng,
  )
  final = jax.lax.while_loop(keep_going, decode_step, state)
  tokens = jnp.concatenate([input_ids.astype(jnp.int32), final[3]], axis=1)
  return (tokens, final[2]) if return_cache else tokens


def generate(
    model: nn.Module,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    apply_fn: ApplyFn | None = None,
    adapter_ids: jax.typing.ArrayLike | None = None,
    cache: Any = None,
    cache_length: int | None = None,
    return_cache: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
  """Continues a (left-padded) batch of prompts by ``max_new_tokens`` tokens with a KV cache.

  The prompt fills the cache in one call, then one token per step is chosen and fed back. The cache
  holds ``prompt_length + max_new_tokens`` slots from the start, so all steps share one compiled
  ``while_loop`` body; the whole function is jitted, keyed on ``model``, ``apply_fn`` (by identity:
  reuse the same function object to avoid recompiling), the shapes and the static options.

  Positions follow the mask (``cumsum(mask) - 1``), so left padding does not shift them, as in
  transformers' ``generate``. A row that produced an end-of-sequence token gets ``pad_token_id``
  afterwards; decoding stops early once every row has finished.

  Args:
    model: a causal LM of ``jlora.models``.
    params: its ``params`` tree.
    input_ids: int prompts, shape ``(B, T)``, padded on the left.
    attention_mask: 1 for tokens, 0 for padding, shape ``(B, T)``; None means no padding.
    max_new_tokens: number of tokens to generate.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among the ``k`` most likely tokens only.
    top_p: sample within the nucleus of probability mass ``top_p``.
    rng: PRNG key, required when sampling (``temperature > 0``).
    eos_token_id: end-of-sequence token id(s), or None to always produce ``max_new_tokens``.
    pad_token_id: filler after end of sequence; defaults to the (first) eos id, else 0.
    apply_fn: called instead of ``model.apply`` for every model call, with the same signature
      ``(variables, *args, **kwargs)``, e.g. ``lora.apply_fn(adapters)``.
    adapter_ids: int ``(B,)``: each row's slot of a ``jlora.AdapterBank`` (-1: the base model), passed to
      ``apply_fn`` (``bank.apply_fn()``, with ``params=bank.inject(params, state)``) as ``adapter_ids=``.
      A traced argument: other ids or other slot contents reuse the compiled loop.
    cache: a cache returned by an earlier call (``return_cache=True``) to continue: ``input_ids`` are then
      only the new tokens, written after the cached ones (positions continue from them), and the earlier
      tokens are not recomputed. Its capacity must hold the new and generated tokens.
    cache_length: capacity in tokens of a new cache (default ``T + max_new_tokens``); make it larger to
      continue the conversation later.
    return_cache: also return the cache after the last token, for a later ``cache=``.

  Returns:
    int32 array ``(B, T + max_new_tokens)``: the prompts followed by the generated tokens; with
    ``return_cache``, ``(tokens, cache)``.

  Raises:
    JloraError: sampling without an rng, invalid sampling options, ``adapter_ids`` without an ``apply_fn``,
      or a cache too small for the tokens.
  """
  if max_new_tokens < 1:
    raise JloraError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  greedy = temperature == 0
  if temperature < 0:
    raise JloraError(f"temperature must be >= 0, got {temperature}.")
  if not greedy and rng is None:
    raise JloraError("Sampling (temperature > 0) needs rng=jax.random.key(seed).")
  if top_k is not None and top_k < 1:
    raise JloraError(f"top_k must be >= 1, got {top_k}.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise JloraError(f"top_p must be in (0, 1], got {top_p}.")
  if eos_token_id is None:
    eos_ids: tuple[int, ...] = ()
  elif isinstance(eos_token_id, int):
    eos_ids = (eos_token_id,)
  else:
    eos_ids = tuple(int(i) for i in eos_token_id)
  if pad_token_id is None:
    pad_token_id = eos_ids[0] if eos_ids else 0
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  if adapter_ids is not None:
    if apply_fn is None:
      raise JloraError("adapter_ids selects each row's slot of a jlora.AdapterBank: pass apply_fn=bank.apply_fn() "
                       "and params=bank.inject(params, state).")
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
  batch, length = np.shape(input_ids)
  if cache is not None:
    if cache_length is not None:
      raise JloraError("cache_length sizes a new cache; a continued cache keeps its own capacity.")
    used, capacity, rows = _cache_extent(cache)
    if rows != batch:
      raise JloraError(f"The cache holds {rows} rows, input_ids {batch}.")
    if used + length + max_new_tokens > capacity:
      raise JloraError(f"The cache holds {used} of {capacity} tokens: {length} new and {max_new_tokens} generated ones "
                       "do not fit. Start the conversation with a larger cache_length.")
  else:
    cache_length = length + max_new_tokens if cache_length is None else cache_length
    if cache_length < length + max_new_tokens:
      raise JloraError(f"cache_length={cache_length} cannot hold {length} prompt and {max_new_tokens} new tokens.")
  return _generate(
      params,
      jnp.asarray(input_ids),
      jnp.asarray(attention_mask, jnp.int32),
      jax.random.key(0) if rng is None else rng,
      jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      cache,
      adapter_ids,
      model=model,
      apply_fn=apply_fn,
      max_new_tokens=max_new_tokens,
      greedy=greedy,
      top_k=top_k,
      use_top_p=top_p is not None,
      eos_ids=eos_ids,
      pad_id=pad_token_id,
      cache_length=0 if cache is not None else cache_length,
      return_cache=return_cache,
  )


def _cache_extent(cache: Any) -> tuple[int, int, int]:
  """``(tokens written, capacity, rows)`` of a cache from ``init_cache`` / ``generate(..., return_cache=True)``."""
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    name = getattr(path[-1], "key", None)
    if name in ("cache_index", "key_mask"):
      found[name] = leaf
  if set(found) != {"cache_index", "key_mask"}:
    raise JloraError("cache= is not a jlora.models KV cache (no cache_index / key_mask): pass the cache that "
                     "generate(..., return_cache=True) returned.")
  rows, capacity = found["key_mask"].shape
  return int(jax.device_get(found["cache_index"])), capacity, rows
