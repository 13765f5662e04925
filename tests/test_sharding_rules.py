"""Sharding rules and param_specs: default rules for jlora.models, overrides, loud errors, real memory split."""

import ast
import dataclasses
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import JloraError, models, sharding

LLAMA = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
GPT2 = models.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
BERT = models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)

MODELS = {
    "llama_scan": models.LlamaForCausalLM(LLAMA),
    "llama_unrolled_biases": models.LlamaForCausalLM(dataclasses.replace(
        LLAMA, scan_layers=False, qkv_bias=True, o_bias=True, mlp_bias=True)),
    "llama_tied": models.LlamaForCausalLM(dataclasses.replace(LLAMA, tie_word_embeddings=True)),
    "gemma_like": models.LlamaForCausalLM(dataclasses.replace(
        LLAMA, tie_word_embeddings=True, norm_zero_centered=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh")),
    "llama_body": models.LlamaModel(LLAMA),
    "gpt2_scan": models.GPT2LMHeadModel(GPT2),
    "gpt2_unrolled_untied": models.GPT2LMHeadModel(dataclasses.replace(GPT2, scan_layers=False,
                                                                       tie_word_embeddings=False)),
    "bert": models.BertModel(BERT),
    "bert_scan_no_pooler": models.BertModel(dataclasses.replace(BERT, scan_layers=True, add_pooling_layer=False)),
}


def _shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("name", list(MODELS))
def test_default_rules_cover_every_param(name):
  model = MODELS[name]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  specs = _flat(sharding.param_specs(_shapes(model), sharding.rules_for(model), mesh))
  for path, spec in specs.items():
    if path.endswith(("/scale", "LayerNorm/bias", "ln_1/bias", "ln_2/bias", "ln_f/bias")):
      assert spec == P(), path
    if path.endswith("/kernel"):
      assert set(spec) & {"fsdp", "tensor"} or path.endswith("lm_head/kernel"), path


def test_llama_specs_are_megatron_and_fsdp():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  scanned = _flat(sharding.param_specs(_shapes(MODELS["llama_scan"]), sharding.rules_for(MODELS["llama_scan"]), mesh))
  assert scanned["model/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
  assert scanned["model/layers/self_attn/k_proj/kernel"] == P(None, "fsdp", "tensor")
  assert scanned["model/layers/mlp/up_proj/kernel"] == P(None, "fsdp", "tensor")
  assert scanned["model/layers/self_attn/o_proj/kernel"] == P(None, "tensor", "fsdp")
  assert scanned["model/layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
  assert scanned["model/embed_tokens/embedding"] == P("tensor", "fsdp")
  assert scanned["lm_head/kernel"] == P("fsdp", "tensor")
  assert scanned["model/layers/input_layernorm/scale"] == P()
  unrolled_model = MODELS["llama_unrolled_biases"]
  unrolled = _flat(sharding.param_specs(_shapes(unrolled_model), sharding.rules_for(unrolled_model), mesh))
  assert unrolled["model/layers_1/self_attn/v_proj/kernel"] == P("fsdp", "tensor")
  assert unrolled["model/layers_1/self_attn/v_proj/bias"] == P("tensor")  # follows its kernel's out axis
  assert unrolled["model/layers_0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
  assert unrolled["model/layers_0/mlp/down_proj/bias"] == P()
  gpt2 = MODELS["gpt2_scan"]
  gpt2_specs = _flat(sharding.param_specs(_shapes(gpt2), sharding.rules_for(gpt2), mesh))
  assert gpt2_specs["transformer/h/attn/c_attn/kernel"] == P(None, "fsdp", "tensor")
  assert gpt2_specs["transformer/h/attn/c_attn/bias"] == P(None, "tensor")
  assert gpt2_specs["transformer/h/mlp/c_proj/kernel"] == P(None, "tensor", "fsdp")
  bert = MODELS["bert"]
  bert_specs = _flat(sharding.param_specs(_shapes(bert), sharding.rules_for(bert), mesh))
  assert bert_specs["encoder/layer_0/attention/self/query/kernel"] == P("fsdp", "tensor")
  assert bert_specs["encoder/layer_0/attention/output/dense/kernel"] == P("tensor", "fsdp")
  assert bert_specs["encoder/layer_1/output/dense/kernel"] == P("tensor", "fsdp")
  assert bert_specs["encoder/layer_1/intermediate/dense/bias"] == P("tensor")


def test_rules_for_other_modules_raises():
  with pytest.raises(JloraError, match="Dense"):
    sharding.rules_for(nn.Dense(3))


def test_sharding_never_imports_the_models():
  """jlora.sharding is the lower layer: it reads a model's own partition_rules and never loads jlora.models."""
  code = textwrap.dedent("""
      import sys
      import flax.linen as nn
      from jax.sharding import PartitionSpec as P
      from jlora import JloraError, sharding

      class Model(nn.Module):
        partition_rules = (("w", ("fsdp", None)),)

      assert sharding.rules_for(Model()) == (("w", P("fsdp", None)),)
      try:
        sharding.rules_for(nn.Dense(3))
        raise AssertionError("rules_for(nn.Dense) did not raise")
      except JloraError:
        pass
      print(sorted(name for name in sys.modules if name.startswith("jlora.models")))
  """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"
  for source in pathlib.Path(sharding.__file__).parent.glob("*.py"):  # nor lazily, in a branch not run above
    for node in ast.walk(ast.parse(source.read_text())):
      if isinstance(node, ast.ImportFrom):
        imported = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
      elif isinstance(node, ast.Import):
        imported = [alias.name for alias in node.names]
      else:
        continue
      assert not any(name.startswith("jlora.models") for name in imported), (source.name, ast.unparse(node))


def test_rules_from_config_override_the_defaults():
  model = MODELS["llama_scan"]
  pairs = [(".*q_proj/kernel", [None, ["fsdp", "tensor"], None]), (".*norm/scale", ())]
  rules = sharding.rules_from_config(pairs, defaults=sharding.rules_for(model))
  assert rules[0] == (".*q_proj/kernel", P(None, ("fsdp", "tensor"), None))
  assert rules[2:] == sharding.rules_for(model)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  specs = _flat(sharding.param_specs(_shapes(model), rules, mesh))
  assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, ("fsdp", "tensor"), None)
  assert specs["model/layers/self_attn/k_proj/kernel"] == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("pairs, message", [
    ([("(", (None,))], "invalid regex"),
    ([(".*", "fsdp")], "a spec is a PartitionSpec or a tuple"),
    ([(".*", (None, 3))], "is not None, an axis name"),
    ([(".*",)], r"a \(regex, PartitionSpec\) pair"),
])
def test_rules_from_config_errors(pairs, message):
  with pytest.raises(JloraError, match=message):
    sharding.rules_from_config(pairs)


PARAMS = {"block": {"dense": {"kernel": jnp.zeros((12, 16)), "bias": jnp.zeros((16,))}},
          "layers": {"kernel": jax.ShapeDtypeStruct((3, 12, 16), jnp.float32)}}


def test_param_specs_on_arrays_and_shape_structs():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  rules = [("block/dense/kernel", P("fsdp", "tensor")), (".*/bias", P("tensor")),
           ("layers/kernel", P(None, "fsdp", "tensor"))]
  specs = sharding.param_specs(PARAMS, rules, mesh)
  assert specs == {"block": {"dense": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}},
                   "layers": {"kernel": P(None, "fsdp", "tensor")}}
  shardings = sharding.named(specs, mesh)
  assert shardings["layers"]["kernel"] == NamedSharding(mesh, P(None, "fsdp", "tensor"))
  placed = sharding.shard(PARAMS["block"], shardings["block"])
  assert placed["dense"]["kernel"].sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert placed["dense"]["kernel"].addressable_shards[0].data.shape == (3, 8)
  np.testing.assert_array_equal(np.asarray(placed["dense"]["kernel"]), np.asarray(PARAMS["block"]["dense"]["kernel"]))
  key = sharding.shard(jax.random.key(0), NamedSharding(mesh, P()))  # typed keys take the device_put path
  assert key.sharding == NamedSharding(mesh, P())


def test_param_specs_names_an_uncovered_param():
  mesh = sharding.make_mesh({"fsdp": 8})
  with pytest.raises(JloraError, match="no rule covers param 'block/dense/bias'") as error:
    sharding.param_specs(PARAMS, [(".*kernel", P())], mesh)
  assert "1 parameter(s)" in str(error.value)


def test_param_specs_names_a_non_dividing_axis():
  mesh = sharding.make_mesh({"fsdp": 8, "tensor": 1})
  with pytest.raises(JloraError, match=r"param 'block/dense/kernel'.*fsdp=8 \(8 parts\) do not divide dimension 0 "
                                       r"\(size 12\)"):
    sharding.param_specs(PARAMS, [(".*kernel", P("fsdp", "tensor")), (".*", P())], mesh)
  with pytest.raises(JloraError, match=r"param 'layers/kernel'.*fsdp=8 x tensor=1 \(8 parts\) do not divide "
                                       r"dimension 1 \(size 12\)"):
    sharding.param_specs(PARAMS, [("layers/kernel", P(None, ("fsdp", "tensor"), None)), (".*", P())], mesh)


def test_axes_of_size_one_always_divide():
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  specs = sharding.param_specs({"w": jnp.zeros((3, 5))}, [("w", P("fsdp", "tensor"))], mesh)
  assert specs == {"w": P("fsdp", "tensor")}


@pytest.mark.parametrize("spec, message", [
    (P("fsdp", "tensor"), r"param 'layers/kernel'.*has 2 entries but the shape \(3, 12, 16\) has 3 dimensions"),
    (P(None, "model", None), r"names mesh axis 'model'"),
    (P(None, "fsdp", "fsdp"), r"uses mesh axis 'fsdp' twice"),
])
def test_param_specs_rejects_specs_that_do_not_fit(spec, message):
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  with pytest.raises(JloraError, match=message):
    sharding.param_specs(PARAMS, [("layers/kernel", spec), (".*", P())], mesh)


def test_fsdp_splits_the_base_params_eight_ways():
  config = dataclasses.replace(LLAMA, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
  model = models.LlamaForCausalLM(config)
  assert model.config.scan_layers
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  shapes = _shapes(model)
  specs = sharding.param_specs(shapes, sharding.rules_for(model), mesh)
  rng = np.random.default_rng(0)
  params = sharding.shard(jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes),
                          sharding.named(specs, mesh))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  per_device = {d: 0 for d in jax.devices()}
  for x in jax.tree.leaves(params):
    for shard in x.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  # Only the norm scales (3 * 2 * 64 + 64 floats) are replicated; every matrix is split eight ways.
  replicated = sum(x.nbytes for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs)) if spec == P())
  assert replicated == (3 * 2 * 64 + 64) * 4
  for nbytes in per_device.values():
    assert nbytes == (total - replicated) / 8 + replicated
    assert nbytes <= total / 8 * 1.05, (nbytes, total)
