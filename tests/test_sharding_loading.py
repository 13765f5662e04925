"""from_pretrained(..., mesh=...): params load straight into their rule shardings, reading only the blocks the
devices hold, with the same values as unsharded loading."""

import collections
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import JloraError, models, sharding
from jlora.models._checkpoint import _slots
from jlora.models._name_maps import name_map
from jlora.models._safetensors import SafetensorsReader

CONFIGS = {
    "llama_scan": models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, qkv_bias=True, o_bias=True),
    "gpt2_scan": models.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2),
    "bert_unrolled": models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16),
}


def _save(directory, config, dtype=np.float32, files=1):
  """A checkpoint of random weights (no compile: shapes from eval_shape, values from numpy): (model, params)."""
  model = models.model_for_config(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(dtype), shapes)
  models.save_pretrained(directory, model, params)
  if files > 1:  # re-split into several files with an index, as large HF checkpoints are
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    weight_map = {}
    for i, chunk in enumerate(np.array_split(sorted(tensors), files)):
      file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
      safetensors.numpy.save_file({n: tensors[n] for n in chunk}, directory / file, metadata={"format": "pt"})
      weight_map.update({n: file for n in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return model, params


def _assert_loaded(loaded, saved):
  """Every loaded param is bit for bit the array that was saved."""
  assert jax.tree.structure(loaded) == jax.tree.structure(saved)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def record_reads(monkeypatch):
  """Forbids whole-tensor reads and records the shape of every block read: {tensor name: [shape, ...]}."""
  reads = collections.defaultdict(list)
  get_slice = SafetensorsReader.get_slice

  def recording_get_slice(self, name, index):
    block = get_slice(self, name, index)
    reads[name].append(block.shape)
    return block

  def no_get(self, name):
    raise AssertionError(f"whole-tensor read of {name!r} while loading onto a mesh")

  monkeypatch.setattr(SafetensorsReader, "get_slice", recording_get_slice)
  monkeypatch.setattr(SafetensorsReader, "get", no_get)
  return reads


@pytest.mark.parametrize("name, files", [("llama_scan", 1), ("llama_scan", 3), ("gpt2_scan", 1),
                                         ("bert_unrolled", 1)])
def test_loads_into_rule_shardings_reading_only_blocks(tmp_path, name, files, record_reads):
  config = CONFIGS[name]
  _, saved = _save(tmp_path, config, files=files)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  model, params = models.from_pretrained(tmp_path, mesh=mesh)
  specs = sharding.param_specs(params, sharding.rules_for(model), mesh)
  assert jax.tree.map(lambda x: x.sharding, params) == sharding.named(specs, mesh)
  reads = dict(record_reads)
  _assert_loaded(params, saved)  # the blocks read are the right blocks, from whichever file holds each tensor

  # Every tensor is read in exactly as many blocks as its param has distinct shards, each 1/n of it.
  flat_specs = traverse_util.flatten_dict(specs, sep="/")
  sizes = dict(mesh.shape)
  for slot in _slots(name_map(model.config), model.config.scan_layers):
    spec = flat_specs[slot.param_path]
    parts = math.prod(sizes[a] for entry in spec if entry is not None
                      for a in ((entry,) if isinstance(entry, str) else entry))
    shapes = reads[slot.hf_name]
    with SafetensorsReader(tmp_path) as reader:
      full = math.prod(reader.shape(slot.hf_name))
    assert len(shapes) == parts, (slot.hf_name, spec, shapes)
    assert all(math.prod(s) * parts == full for s in shapes), (slot.hf_name, spec, shapes)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_values_equal_unsharded_loading(tmp_path, name):
  _, saved = _save(tmp_path, CONFIGS[name])
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  _, sharded = models.from_pretrained(tmp_path, mesh=mesh)
  _, whole = models.from_pretrained(tmp_path)
  _assert_loaded(sharded, saved)
  _assert_loaded(whole, saved)


def test_bf16_checkpoint_into_float32_shards(tmp_path):
  config = dataclasses.replace(CONFIGS["llama_scan"], qkv_bias=False, o_bias=False)
  _, saved = _save(tmp_path, config, dtype=ml_dtypes.bfloat16)
  mesh = sharding.make_mesh({"fsdp": 8, "tensor": 1})
  _, sharded = models.from_pretrained(tmp_path, mesh=mesh, param_dtype=jnp.float32)
  _, whole = models.from_pretrained(tmp_path, param_dtype=jnp.float32)
  kernel = sharded["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert kernel.dtype == jnp.float32 and kernel.sharding.spec == P(None, "tensor", "fsdp")
  assert kernel.addressable_shards[0].data.shape == (2, 64, 4)
  _assert_loaded(sharded, saved)  # bf16 values, exactly, in float32
  _assert_loaded(whole, saved)


def test_custom_rules_and_errors(tmp_path):
  _, saved = _save(tmp_path, CONFIGS["llama_scan"])
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  model = models.LlamaForCausalLM(CONFIGS["llama_scan"])
  rules = sharding.rules_from_config([(".*/q_proj/kernel", (None, None, ("fsdp", "tensor")))],
                                     defaults=sharding.rules_for(model))
  _, params = models.from_pretrained(tmp_path, mesh=mesh, rules=rules)
  q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P(None, None, ("fsdp", "tensor")))
  assert q.addressable_shards[0].data.shape == (2, 32, 4)
  _assert_loaded(params, saved)
  with pytest.raises(models.CheckpointError, match="rules but no mesh"):
    models.from_pretrained(tmp_path, rules=rules)
  with pytest.raises(JloraError, match=r"param 'model/layers/self_attn/k_proj/kernel'.*tensor=4 x fsdp=2 \(8 parts\) "
                                       r"do not divide dimension 0 \(size 2\)"):
    models.from_pretrained(tmp_path, mesh=mesh, rules=[(".*k_proj/kernel", (("tensor", "fsdp"), None, None))] + list(rules))
  with pytest.raises(JloraError, match="no rule covers param 'lm_head/kernel'"):
    models.from_pretrained(tmp_path, mesh=mesh, rules=[("model/.*", P())])
