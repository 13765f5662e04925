"""Partition specs of quantized kernels, and a sharded QLoRA train step on the 8-device CPU mesh."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import JloraError, models, quant, sharding

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _abstract(shape, **kwargs):
  return jax.eval_shape(lambda k: quant.quantize_array(k, **kwargs), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_leaf_specs_follow_the_kernel_spec():
  stacked = _abstract((3, 256, 96))  # 3 layers, in 256 (4 blocks a row), out 96
  specs = quant.partition_specs(stacked, P(None, "fsdp", "tensor"))
  assert (specs.codes, specs.absmax, specs.absmax_scale, specs.absmax_offset) == (
      P(None, "tensor", "fsdp"), P(None, "tensor", "fsdp"), P(None, None), P(None))
  assert quant.kernel_spec(specs) == P(None, "fsdp", "tensor")
  replicated = quant.partition_specs(stacked, P())
  assert (replicated.codes, replicated.absmax_scale) == (P(), P()) and quant.kernel_spec(replicated) == P()
  plain = quant.partition_specs(_abstract((256, 96), double_quant=False), P("fsdp", None))
  assert (plain.codes, plain.absmax, plain.absmax_scale, plain.absmax_offset) == (
      P(None, "fsdp"), P(None, "fsdp"), None, None)
  flat = _abstract((3, 96, 64))  # in 96: blocks straddle rows
  assert quant.partition_specs(flat, P("data", None, None)).codes == P("data", None)
  with pytest.raises(JloraError, match="input size 96, not a multiple of its block size 64"):
    quant.partition_specs(flat, P(None, "fsdp", None))
  with pytest.raises(JloraError, match="has 2 entries, but the quantized kernel of shape \\(3, 256, 96\\) has 3"):
    quant.partition_specs(stacked, P("fsdp", "tensor"))


CONFIG = models.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
PROJECTIONS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def _random_like(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: (scale * rng.standard_normal(v.shape)).astype(v.dtype), tree)


def test_param_specs_split_blocks_never_bytes():
  model = models.LlamaForCausalLM(CONFIG)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  qparams = jax.eval_shape(lambda p: quant.quantize(p, PROJECTIONS, block_size=32), params)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  specs = sharding.param_specs(qparams, sharding.rules_for(model), mesh)
  down = specs["model"]["layers"]["mlp"]["down_proj"]["kernel"]  # kernel (2, 256, 128), P(None, 'tensor', 'fsdp')
  assert (down.codes, down.absmax) == (P(None, "fsdp", "tensor"), P(None, "fsdp", "tensor"))
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/down_proj/kernel", rank=4))
  adapters = jax.eval_shape(lora.init, jax.random.key(1), qparams, jnp.zeros((1, 4), jnp.int32))
  assert sharding.adapter_specs(adapters, specs, lora.targets)["model"]["layers"]["mlp"]["down_proj"]["kernel"] == {
      "lora_a": P(None, "tensor", None), "lora_b": P(None, None, "fsdp")}
  # 8-way over an input axis of 128 (four blocks of 32) would split blocks.
  with pytest.raises(JloraError, match=r"q_proj/kernel'.*into 8 parts, which do not hold whole blocks of 32"):
    sharding.param_specs(qparams, sharding.rules_for(model), sharding.make_mesh({"fsdp": 8, "tensor": 1}))


def test_sharded_qlora_train_step_equals_single_device():
  model = models.LlamaForCausalLM(CONFIG)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CONFIG.vocab_size, (8, 8)).astype(np.int32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(1), ids)["params"], 1, 0.2)
  qparams = quant.quantize(params, PROJECTIONS, block_size=32)  # 4-way tensor parallel over o_proj's input 128
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|v_proj|down_proj)/kernel", rank=4, alpha=8.0))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(2), qparams, ids), 2, 0.1)
  tx = optax.adamw(1e-2)

  def step(adapters, opt_state, qparams, ids):
    def loss_fn(adapters):
      logp = jax.nn.log_softmax(lora.apply(qparams, adapters, ids)[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  opt_state = tx.init(adapters)
  reference = jax.jit(step, compiler_options=FAST)(*jax.device_put((adapters, opt_state, qparams, ids),
                                                                   jax.devices()[0]))

  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  specs = sharding.param_specs(qparams, sharding.rules_for(model), mesh)
  adapter_shardings = sharding.named(sharding.adapter_specs(adapters, specs, lora.targets), mesh)
  opt_shardings = sharding.tree_shardings_like(jax.eval_shape(tx.init, adapters),
                                               sharding.adapter_specs(adapters, specs, lora.targets), mesh)
  param_shardings = sharding.named(specs, mesh)
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  sharded = jax.jit(step, in_shardings=(adapter_shardings, opt_shardings, param_shardings, batch_sharding),
                    out_shardings=(adapter_shardings, opt_shardings, NamedSharding(mesh, P())), compiler_options=FAST)
  placed = sharding.shard(qparams, param_shardings)
  codes = placed["model"]["layers"]["mlp"]["down_proj"]["kernel"].codes  # (2, 128, 128): out over fsdp, in/2 over tensor
  assert {shard.data.shape for shard in codes.addressable_shards} == {(2, 64, 32)}
  got = sharded(jax.device_put(adapters, adapter_shardings), jax.device_put(opt_state, opt_shardings), placed,
                jax.device_put(ids, batch_sharding))
  chex.assert_trees_all_close(got, reference, atol=1e-5, rtol=0)
  assert jax.tree.map(lambda a: a.sharding, got[0]) == adapter_shardings
