"""KV-cache generation: exact agreement with an uncached argmax loop and with transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_models_references import DECODERS, left_padded_batch, save_hf, tiny_hf_model

from jlora import models

NEW_TOKENS = 8
# One prompt shape for every test: generate() is jitted on (model, shapes, options), so tests that
# decode the same tiny model share its compiled loop.
PROMPT_LENGTH, PAD = 7, 2


def _prompt(seed):
  return left_padded_batch(seed=seed, length=PROMPT_LENGTH, pad=PAD)


def _uncached_greedy(model, params, ids, mask, steps):
  """Reference decoder: recompute the whole sequence for every new token, no cache.

  The sequence lives in a fixed buffer whose not-yet-generated tail is masked out (causal attention
  never looks at it), so the full forward pass compiles once.
  """
  batch, length = ids.shape
  tokens = np.concatenate([ids, np.zeros((batch, steps), np.int32)], axis=1)
  valid = np.concatenate([mask, np.zeros((batch, steps), np.int32)], axis=1)
  forward = jax.jit(lambda t, m: model.apply({"params": params}, t, m))
  for step in range(steps):
    logits = forward(tokens, valid)
    tokens[:, length + step] = np.asarray(jnp.argmax(logits[:, length + step - 1], axis=-1))
    valid[:, length + step] = 1
  return tokens


def _load(arch, tmp_path, **kwargs):
  reference = tiny_hf_model(arch, matrix_noise=0.2)
  model, params = models.from_pretrained(save_hf(reference, tmp_path), **kwargs)
  return reference, model, params


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_matches_uncached_loop_and_transformers(arch, tmp_path):
  reference, model, params = _load(arch, tmp_path)
  ids, mask = _prompt(2)
  tokens = models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS)
  assert tokens.shape == (2, PROMPT_LENGTH + NEW_TOKENS)
  np.testing.assert_array_equal(tokens, _uncached_greedy(model, params, ids, mask, NEW_TOKENS))

  reference.generation_config.eos_token_id = None
  with torch.no_grad():
    expected = reference.generate(
        torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    ).numpy()
  np.testing.assert_array_equal(tokens, expected)


def test_unrolled_layers_decode_like_scanned(tmp_path):
  _, scanned, params = _load("llama", tmp_path / "a")
  _, unrolled, unrolled_params = _load("llama", tmp_path / "b", scan_layers=False)
  ids, mask = _prompt(3)
  np.testing.assert_array_equal(
      models.generate(scanned, params, ids, mask, max_new_tokens=NEW_TOKENS),
      models.generate(unrolled, unrolled_params, ids, mask, max_new_tokens=NEW_TOKENS),
  )


def test_decoding_compiles_one_step_for_all_tokens(tmp_path):
  _, model, params = _load("llama", tmp_path)
  traced_calls = []

  def counting_apply(variables, *args, **kwargs):
    traced_calls.append(args[0].shape)  # runs only while tracing
    return model.apply(variables, *args, **kwargs)

  ids, mask = _prompt(4)
  first = models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, apply_fn=counting_apply)
  # One prefill call and one while_loop body, whatever the number of tokens.
  assert traced_calls == [(2, PROMPT_LENGTH), (2, 1)]
  again = models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, apply_fn=counting_apply)
  assert len(traced_calls) == 2  # the second call reuses the compiled loop
  np.testing.assert_array_equal(first, again)


def test_cache_chunks_equal_full_forward(tmp_path):
  _, model, params = _load("gemma", tmp_path)
  ids, mask = left_padded_batch(seed=5, length=10, pad=3)
  full = jax.jit(model.apply)({"params": params}, ids, mask)
  cache = models.init_cache(model, batch_size=2, max_length=16)
  assert cache["model"]["layers"]["self_attn"]["cached_key"].shape == (2, 2, 16, 1, 24)
  decode = jax.jit(
      lambda cache, t, m: model.apply({"params": params, "cache": cache}, t, m, decode=True, mutable=["cache"])
  )
  first, state = decode(cache, ids[:, :6], mask[:, :6])
  second, state = decode(state["cache"], ids[:, 6:], mask[:, 6:])
  assert int(state["cache"]["model"]["cache_index"]) == 10
  chunked = jnp.concatenate([first, second], axis=1)
  keep = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(chunked)[keep], np.asarray(full)[keep], rtol=0, atol=1e-5)


def test_eos_pads_finished_rows(tmp_path):
  _, model, params = _load("gpt2", tmp_path)
  ids, mask = _prompt(6)
  greedy = np.asarray(models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS))
  new_tokens = greedy[:, PROMPT_LENGTH:]
  # The eos token: one that row 1 first produces at step k >= 1 (so rows finish at different steps).
  k = next(k for k in range(1, NEW_TOKENS) if new_tokens[1, k] not in new_tokens[1, :k])
  eos = int(new_tokens[1, k])
  stopped = np.asarray(
      models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=127)
  )
  for row in range(2):
    hits = np.flatnonzero(new_tokens[row] == eos)
    end = PROMPT_LENGTH + (hits[0] + 1 if hits.size else NEW_TOKENS)
    np.testing.assert_array_equal(stopped[row, :end], greedy[row, :end])  # up to and including eos
    assert (stopped[row, end:] == 127).all()  # then padding
  assert (stopped[1, PROMPT_LENGTH + k + 1 :] == 127).all() and k + 1 < NEW_TOKENS


def test_top_k_one_sampling_is_greedy(tmp_path):
  _, model, params = _load("qwen2", tmp_path)
  ids, mask = _prompt(7)
  greedy = models.generate(model, params, ids, mask, max_new_tokens=NEW_TOKENS)
  sampled = models.generate(
      model, params, ids, mask, max_new_tokens=NEW_TOKENS, temperature=0.7, top_k=1, rng=jax.random.key(3)
  )
  np.testing.assert_array_equal(sampled, greedy)


def test_sampling_is_reproducible_and_random(tmp_path):
  _, model, params = _load("llama", tmp_path)
  ids, mask = _prompt(8)
  sample = lambda seed: np.asarray(models.generate(  # noqa: E731
      model, params, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=0.95, rng=jax.random.key(seed)
  ))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert any((sample(0) != sample(seed)).any() for seed in (1, 2, 3))


def test_sampling_without_rng_is_an_error(tmp_path):
  _, model, params = _load("gpt2", tmp_path)
  with pytest.raises(ValueError, match="rng"):
    models.generate(model, params, jnp.ones((1, 3), jnp.int32), max_new_tokens=2, temperature=1.0)
