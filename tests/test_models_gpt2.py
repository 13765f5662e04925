"""GPT-2 against transformers' GPT2LMHeadModel."""

import jax
import numpy as np
import pytest
import safetensors.numpy
from test_models_references import (
  assert_close_on_tokens,
  left_padded_batch,
  position_ids,
  save_hf,
  tiny_hf_model,
  torch_outputs,
)

from jlora import models


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_logits_match_transformers_on_left_padded_batch(scan_layers, tmp_path):
  reference = tiny_hf_model("gpt2")
  model, params = models.from_pretrained(save_hf(reference, tmp_path), scan_layers=scan_layers)
  assert isinstance(model, models.GPT2LMHeadModel)
  ids, mask = left_padded_batch()
  expected = torch_outputs(reference, ids, mask, position_ids=position_ids(mask))
  logits = jax.jit(model.apply)({"params": params}, ids, mask)
  assert_close_on_tokens(logits, expected, mask, atol=1e-4)


def test_conv1d_weights_are_kernels_as_stored(tmp_path):
  reference = tiny_hf_model("gpt2")
  _, params = models.from_pretrained(save_hf(reference, tmp_path), scan_layers=False)
  c_attn = reference.transformer.h[1].attn.c_attn.weight.detach().numpy()  # Conv1D: (in, out)
  np.testing.assert_array_equal(params["transformer"]["h_1"]["attn"]["c_attn"]["kernel"], c_attn)
  assert c_attn.shape == (64, 192)


def test_original_gpt2_layout_loads(tmp_path):
  """openai-community/gpt2 files: GPT2Model names (no "transformer."), attn.bias buffers, no lm_head."""
  reference = tiny_hf_model("gpt2")
  save_hf(reference, tmp_path)
  tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  legacy = {name.removeprefix("transformer."): value for name, value in tensors.items() if name != "lm_head.weight"}
  for i in range(2):
    legacy[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    legacy[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  safetensors.numpy.save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
  model, params = models.from_pretrained(tmp_path)
  ids, mask = left_padded_batch()
  expected = torch_outputs(reference, ids, mask, position_ids=position_ids(mask))
  assert_close_on_tokens(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask, atol=1e-4)


def test_dropout_needs_an_rng_and_is_off_by_default(tmp_path):
  model, params = models.from_pretrained(save_hf(tiny_hf_model("gpt2"), tmp_path))
  assert model.config.resid_pdrop == 0.1
  ids, mask = left_padded_batch()
  train = jax.jit(lambda p, key: model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": key}))
  first, again, other = (train(params, jax.random.key(seed)) for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert np.abs(np.asarray(first - other)).max() > 1e-3
  evaluation = jax.jit(model.apply)({"params": params}, ids, mask)
  assert np.abs(np.asarray(first - evaluation)).max() > 1e-3
