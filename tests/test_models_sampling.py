"""Token choice: greedy, top-k and top-p filtering on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import sample_token
from jlora.models._sampling import top_k_filter, top_p_filter

# Probabilities of tokens 0..5, deliberately unsorted.
PROBS = np.array([0.05, 0.40, 0.02, 0.25, 0.20, 0.08])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None, :]


def _kept(filtered):
  return set(np.flatnonzero(np.isfinite(np.asarray(filtered[0]))).tolist())


def test_top_p_keeps_the_smallest_nucleus():
  # Sorted: 1 (.40), 3 (.25), 4 (.20), 5 (.08), 0 (.05), 2 (.02).
  assert _kept(top_p_filter(LOGITS, 0.30)) == {1}
  assert _kept(top_p_filter(LOGITS, 0.60)) == {1, 3}
  assert _kept(top_p_filter(LOGITS, 0.70)) == {1, 3, 4}
  assert _kept(top_p_filter(LOGITS, 0.90)) == {1, 3, 4, 5}
  assert _kept(top_p_filter(LOGITS, 1.00)) == {0, 1, 2, 3, 4, 5}
  assert _kept(top_p_filter(LOGITS, 0.01)) == {1}  # the most likely token always stays


def test_top_p_matches_numpy_rederivation_per_row():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
  for top_p in (0.2, 0.5, 0.9):
    filtered = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
    for row, row_logits in zip(filtered, logits):
      probs = np.exp(row_logits - row_logits.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      mass_before = np.cumsum(probs[order]) - probs[order]
      expected = set(order[mass_before < top_p].tolist())
      assert set(np.flatnonzero(np.isfinite(row)).tolist()) == expected


def test_top_k_keeps_k_largest():
  assert _kept(top_k_filter(LOGITS, 1)) == {1}
  assert _kept(top_k_filter(LOGITS, 3)) == {1, 3, 4}


def test_samples_stay_in_the_nucleus_with_the_right_frequencies():
  keys = jax.random.split(jax.random.key(0), 4000)
  logits = jnp.broadcast_to(LOGITS, (4000, 6))
  draw = jax.vmap(lambda key, row: sample_token(row[None], key, temperature=1.0, top_p=0.7)[0])
  tokens = np.asarray(draw(keys, logits))
  assert set(tokens.tolist()) == {1, 3, 4}
  frequencies = np.bincount(tokens, minlength=6)[[1, 3, 4]] / len(tokens)
  np.testing.assert_allclose(frequencies, PROBS[[1, 3, 4]] / PROBS[[1, 3, 4]].sum(), atol=0.03)


def test_greedy_and_top_k_one_agree():
  logits = jax.random.normal(jax.random.key(1), (8, 32))
  greedy = sample_token(logits, None, temperature=0.0)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, axis=-1))
  np.testing.assert_array_equal(sample_token(logits, jax.random.key(2), temperature=2.0, top_k=1), greedy)
