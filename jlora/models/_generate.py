"""Autoregressive generation with a fixed-size KV cache, compiled once as a single ``while_loop``.

Every model call goes through ``apply_fn`` (``model.apply`` by default), with the cache as an
ordinary flax collection: ``apply_fn({"params": params, "cache": cache}, ids, attention_mask=...,
decode=True, mutable=["cache"])``. A function with ``model.apply``'s signature that rewrites
``variables["params"]`` (e.g. ``jlora.Lora.apply_fn(adapters)``) therefore decodes with adapters
without merging them.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora.models._kv_cache import init_cache
from jlora.models._sampling import sample_token

ApplyFn = Callable[..., Any]


@functools.partial(
    jax.jit,
    static_argnames=("model", "apply_fn", "max_new_tokens", "greedy", "top_k", "use_top_p", "eos_ids", "pad_id"),
)
def _generate(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    model: nn.Module,
    apply_fn: ApplyFn | None,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> jax.Array:
  apply = model.apply if apply_fn is None else apply_fn
  batch, prompt_length = input_ids.shape

  def forward(cache, ids_bt, mask_bt):
    logits_btv, state = apply(
        {"params": params, "cache": cache}, ids_bt, attention_mask=mask_bt, decode=True, mutable=["cache"]
    )
    return logits_btv[:, -1], state["cache"]

  def choose(logits_bv, key):
    if greedy:
      return sample_token(logits_bv, None, temperature=0)
    return sample_token(
        logits_bv, key, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None
    )

  cache = init_cache(model, batch, prompt_length + max_new_tokens)
  logits_bv, cache = forward(cache, input_ids, attention_mask)

  def keep_going(state):
    step, _, _, _, finished_b, _ = state
    return (step < max_new_tokens) & ~jnp.all(finished_b)

  def decode_step(state):
    step, logits_bv, cache, tokens_bn, finished_b, rng = state
    rng, key = jax.random.split(rng)
    token_b = jnp.where(finished_b, pad_id, choose(logits_bv, key))
    tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
    finished_b = finished_b | jnp.isin(token_b, jnp.asarray(eos_ids, jnp.int32))
    logits_bv, cache = forward(cache, token_b[:, None], jnp.ones((batch, 1), jnp.int32))
    return step + 1, logits_bv, cache, tokens_bn, finished_b, rng

  state = (
      jnp.zeros((), jnp.int32),
      logits_bv,
      cache,
      jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((batch,), bool),
      rng,
  )
  tokens_bn = jax.lax.while_loop(keep_going, decode_step, state)[3]
  return jnp.concatenate([input_ids.astype(jnp.int32), tokens_bn], axis=1)


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
) -> jax.Array:
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

  Returns:
    int32 array ``(B, T + max_new_tokens)``: the prompts followed by the generated tokens.

  Raises:
    JloraError: sampling without an rng, or invalid sampling options.
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
  return _generate(
      params,
      jnp.asarray(input_ids),
      jnp.asarray(attention_mask, jnp.int32),
      jax.random.key(0) if rng is None else rng,
      jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      model=model,
      apply_fn=apply_fn,
      max_new_tokens=max_new_tokens,
      greedy=greedy,
      top_k=top_k,
      use_top_p=top_p is not None,
      eos_ids=eos_ids,
      pad_id=pad_token_id,
  )
