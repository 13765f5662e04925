"""jlora.Lora on every reference model: adapters by regex over HF-named paths, apply == merge, generation, PEFT."""

import jax
import numpy as np
import peft
import pytest
import torch
from test_models_references import (
  DECODERS,
  assert_close_on_tokens,
  left_padded_batch,
  position_ids,
  save_hf,
  tiny_hf_model,
  torch_outputs,
)

import jlora
from jlora import models

TARGETS = {
    "llama": r".*/(q_proj|v_proj)/kernel",
    # Tied embeddings: the adapter acts on both the lookup and the LM head (nn.Embed.attend).
    "llama3_rope": [r".*/(q_proj|v_proj)/kernel", r"model/embed_tokens/embedding"],
    "mistral": r".*/(q_proj|v_proj)/kernel",
    "qwen2": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
    "gemma": r".*/(q_proj|v_proj)/kernel",
    "gpt2": r".*/(c_attn|c_proj)/kernel",
    "bert": r".*/attention/self/(query|value)/kernel",
}
# Decoding through lora.apply_fn: tied embedding + attend, fused qkv, every projection of a layer.
GENERATION_CHECKS = ("llama3_rope", "gpt2", "qwen2")
EXPECTED_PATHS = {
    "llama": {"model/layers/self_attn/q_proj/kernel", "model/layers/self_attn/v_proj/kernel"},
    "gpt2": {"transformer/h/attn/c_attn/kernel", "transformer/h/attn/c_proj/kernel", "transformer/h/mlp/c_proj/kernel"},
    "bert": {f"encoder/layer_{i}/attention/self/{p}/kernel" for i in (0, 1) for p in ("query", "value")},
}


def _nonzero_b(adapters, seed=0):
  """Random non-zero B factors (an initialised adapter is the identity and would test nothing)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      0.03 * jax.random.normal(key, leaf.shape, leaf.dtype) if path[-1].key == "lora_b" else leaf
      for (path, leaf), key in zip(leaves, keys)
  ])


def _adapter_paths(adapters, prefix=""):
  for key, value in adapters.items():
    if "lora_a" in value:
      yield prefix + key
    else:
      yield from _adapter_paths(value, prefix + key + "/")


@pytest.mark.parametrize("arch", [*DECODERS, "bert"])
def test_lora_apply_equals_merged_params(arch, tmp_path):
  model, params = models.from_pretrained(save_hf(tiny_hf_model(arch, matrix_noise=0.2), tmp_path))
  ids, mask = left_padded_batch(seed=9, length=7, pad=2)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=TARGETS[arch], rank=4, alpha=8.0))
  adapters = _nonzero_b(lora.init(jax.random.key(0), params, ids, mask))
  if arch in EXPECTED_PATHS:
    assert set(_adapter_paths(adapters)) == EXPECTED_PATHS[arch]

  adapted = jax.jit(lambda p, a: lora.apply(p, a, ids, mask))(params, adapters)
  merged = lora.merge(params, adapters)
  expected = jax.jit(model.apply)({"params": merged}, ids, mask)
  assert_close_on_tokens(adapted, np.asarray(expected), mask, atol=1e-5)
  base = jax.jit(model.apply)({"params": params}, ids, mask)
  assert np.abs(np.asarray(adapted - base))[mask.astype(bool)].max() > 1e-3  # the adapters do something

  if arch in GENERATION_CHECKS:
    apply_fn = lora.apply_fn(adapters)
    np.testing.assert_array_equal(
        models.generate(model, params, ids, mask, max_new_tokens=8, apply_fn=apply_fn),
        models.generate(model, merged, ids, mask, max_new_tokens=8),
    )
    # The injected form: one stable function serves every adapter value, traced once.
    assert lora.apply_fn() is lora.apply_fn()
    traces = []
    injected = lora.apply_fn()

    def counting(variables, *args, **kwargs):
      traces.append(1)
      return injected(variables, *args, **kwargs)

    for seed in (1, 2):
      other = _nonzero_b(adapters, seed=seed)
      np.testing.assert_array_equal(
          models.generate(model, lora.inject(params, other), ids, mask, max_new_tokens=8, apply_fn=counting),
          models.generate(model, lora.merge(params, other), ids, mask, max_new_tokens=8),
      )
    assert len(traces) == 2  # prefill + loop body, compiled once for both adapter values


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers-internal deprecation inside PEFT
@pytest.mark.parametrize("arch, hf_targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_matches_peft(arch, hf_targets, tmp_path):
  """Same A/B factors in PEFT (on the transformers model) and in jlora (on the loaded model)."""
  reference = tiny_hf_model(arch)
  model, params = models.from_pretrained(save_hf(reference, tmp_path), scan_layers=False)
  ids, mask = left_padded_batch(seed=10, length=6, pad=2)
  targets = r".*/(" + "|".join(hf_targets) + r")/kernel"
  lora = jlora.Lora(model, jlora.LoraConfig(targets=targets, rank=4, alpha=8.0))
  adapters = _nonzero_b(lora.init(jax.random.key(1), params, ids, mask))

  peft_model = peft.get_peft_model(
      reference,
      peft.LoraConfig(
          r=4, lora_alpha=8, target_modules=hf_targets, lora_dropout=0.0, fan_in_fan_out=arch == "gpt2"
      ),
  ).eval()
  layers = peft_model.base_model.model.model.layers if arch == "llama" else peft_model.base_model.model.transformer.h
  with torch.no_grad():
    for i, layer in enumerate(layers):
      for name in hf_targets:
        module = getattr(layer.self_attn if arch == "llama" else layer.attn, name)
        node = adapters["model" if arch == "llama" else "transformer"][
            f"layers_{i}" if arch == "llama" else f"h_{i}"
        ]["self_attn" if arch == "llama" else "attn"][name]["kernel"]
        module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(node["lora_a"]).T.copy()))
        module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(node["lora_b"]).T.copy()))
  expected = torch_outputs(peft_model, ids, mask, position_ids=position_ids(mask))
  adapted = jax.jit(lambda p, a: lora.apply(p, a, ids, mask))(params, adapters)
  assert_close_on_tokens(adapted, expected, mask, atol=1e-4)
