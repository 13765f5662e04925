"""from_pretrained / save_pretrained: sharded files, bf16, strictness, and round trips through transformers."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from test_models_references import (
  DECODERS,
  assert_close_on_tokens,
  left_padded_batch,
  position_ids,
  save_hf,
  tiny_hf_model,
  torch_outputs,
)

from jlora import models


def _rewrite(directory, edit):
  """Applies ``edit(tensors)`` to a single-file checkpoint in place."""
  path = directory / "model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads(tmp_path):
  reference = tiny_hf_model("llama")
  save_hf(reference, tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  model, params = models.from_pretrained(tmp_path)
  ids, mask = left_padded_batch()
  expected = torch_outputs(reference, ids, mask, position_ids=position_ids(mask))
  assert_close_on_tokens(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask, atol=1e-4)


def test_bf16_checkpoint_loads_exactly(tmp_path):
  reference = tiny_hf_model("qwen2").to(torch.bfloat16)
  save_hf(reference, tmp_path)
  _, params = models.from_pretrained(tmp_path, param_dtype=jnp.bfloat16, scan_layers=False)
  kernel = params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  expected = reference.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}),
         r"unexpected tensors \(1\): 'model\.layers\.0\.self_attn\.extra\.weight'"),
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         r"missing tensors \(1\): 'model\.layers\.1\.mlp\.up_proj\.weight'"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 60), np.float32)}),
         r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 60\), expected \(32, 64\)"),
        (lambda t: t.pop("model.norm.weight"), r"missing tensors \(1\): 'model\.norm\.weight'"),
    ],
    ids=["extra", "missing", "wrong_shape", "missing_final_norm"],
)
def test_loading_is_strict_and_names_the_tensor(edit, message, tmp_path):
  save_hf(tiny_hf_model("qwen2"), tmp_path)
  _rewrite(tmp_path, edit)
  with pytest.raises(models.CheckpointError, match=message):
    models.from_pretrained(tmp_path)


def test_untied_model_without_lm_head_is_an_error(tmp_path):
  save_hf(tiny_hf_model("llama"), tmp_path)
  _rewrite(tmp_path, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(models.CheckpointError, match=r"'lm_head\.weight'"):
    models.from_pretrained(tmp_path)


def test_allow_listed_buffers_and_tied_head_are_accepted(tmp_path):
  reference = tiny_hf_model("llama3_rope")  # tied
  save_hf(reference, tmp_path)
  embedding = reference.model.embed_tokens.weight.detach().numpy()
  _rewrite(tmp_path, lambda t: t.update({
      "lm_head.weight": embedding,  # tied heads stored twice
      "model.rotary_emb.inv_freq": np.ones(8, np.float32),
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
  }))
  models.from_pretrained(tmp_path)


def test_bert_body_of_a_task_checkpoint_loads_with_ignore(tmp_path):
  reference = tiny_hf_model("bert")
  save_hf(reference, tmp_path)
  _rewrite(tmp_path, lambda t: t.update({
      **{f"bert.{name}": t.pop(name) for name in list(t)},
      "cls.predictions.bias": np.zeros(128, np.float32),
  }))
  with pytest.raises(models.CheckpointError, match=r"'cls\.predictions\.bias'.*ignore="):
    models.from_pretrained(tmp_path)
  model, params = models.from_pretrained(tmp_path, ignore=[r"cls\..*"])
  ids, mask = left_padded_batch()
  expected = torch_outputs(reference, ids, mask)
  assert_close_on_tokens(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask, atol=1e-4)


def test_bert_pooler_is_optional(tmp_path):
  save_hf(tiny_hf_model("bert"), tmp_path)
  model, params = models.from_pretrained(tmp_path, ignore=[r"pooler\..*"])
  assert not model.config.add_pooling_layer and "pooler" not in params
  _rewrite(tmp_path, lambda t: [t.pop("pooler.dense.weight"), t.pop("pooler.dense.bias")])
  model, params = models.from_pretrained(tmp_path)
  assert not model.config.add_pooling_layer and "pooler" not in params


def test_ignoring_a_needed_tensor_makes_it_missing(tmp_path):
  save_hf(tiny_hf_model("gpt2"), tmp_path)
  with pytest.raises(models.CheckpointError, match=r"missing tensors \(1\): 'transformer\.ln_f\.bias'"):
    models.from_pretrained(tmp_path, ignore=[r"transformer\.ln_f\.bias"])


def test_unsupported_configs_are_refused(tmp_path):
  save_hf(tiny_hf_model("qwen2"), tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  for change, message in [
      ({"model_type": "falcon"}, "model_type='falcon'"),
      ({"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window=True"),
      ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'yarn'"),
      ({"hidden_act": "mish"}, "Unsupported activation 'mish'"),
  ]:
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(models.CheckpointError, match=message):
      models.from_pretrained(tmp_path)
  with pytest.raises(models.CheckpointError, match="no config.json"):
    models.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("arch", [*DECODERS, "bert"])
def test_save_pretrained_round_trips_through_transformers(arch, tmp_path):
  source = save_hf(tiny_hf_model(arch), tmp_path / "source")
  model, params = models.from_pretrained(source, scan_layers=arch != "bert")
  models.save_pretrained(tmp_path / "saved", model, params)

  auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
  reloaded = auto.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
  ids, mask = left_padded_batch()
  kwargs = {} if arch == "bert" else {"position_ids": position_ids(mask)}
  expected = torch_outputs(reloaded, ids, mask, **kwargs)
  assert_close_on_tokens(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask, atol=1e-5)

  model_again, params_again = models.from_pretrained(tmp_path / "saved", scan_layers=arch != "bert")
  assert model_again.config == model.config
  chex.assert_trees_all_equal(params_again, params)


def test_fresh_model_saves_for_transformers(tmp_path):
  config = models.LlamaConfig(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, scan_layers=False, eos_token_id=(1, 2), bos_token_id=0,
  )
  model = models.LlamaForCausalLM(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  models.save_pretrained(tmp_path, model, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert reloaded.config.eos_token_id == [1, 2]
  ids, mask = left_padded_batch()
  expected = torch_outputs(reloaded, ids, mask, position_ids=position_ids(mask))
  assert_close_on_tokens(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask, atol=1e-5)


def test_bf16_params_save_as_bf16(tmp_path):
  source = save_hf(tiny_hf_model("gemma"), tmp_path / "source")
  model, params = models.from_pretrained(source, param_dtype=jnp.bfloat16)
  models.save_pretrained(tmp_path / "saved", model, params)
  tensors = safetensors.numpy.load_file(tmp_path / "saved" / "model.safetensors")
  assert tensors["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"


def test_save_pretrained_refuses_foreign_params(tmp_path):
  source = save_hf(tiny_hf_model("gpt2"), tmp_path / "source")
  model, params = models.from_pretrained(source)
  params = {**params, "adapter": {"lora_a": jnp.zeros((2, 2))}}
  with pytest.raises(models.CheckpointError, match="unexpected param adapter/lora_a"):
    models.save_pretrained(tmp_path / "saved", model, params)
