"""adapter_specs and tree_shardings_like: adapters and optimizer state follow their kernels' shardings, and a
sharded LoRA train step equals the single-device one on every mesh shape."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CASES
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import JloraError, models, sharding

# case name -> ({kernel path: kernel spec}, {kernel path: (lora_a spec, lora_b spec)}), written by hand from each
# kernel's axis roles (see tests/_cases.py).
EXPECTED = {
    "dense": ({"proj/kernel": P("fsdp", "tensor")}, {"proj/kernel": (P("fsdp", None), P(None, "tensor"))}),
    # kernel (in 4, in 5, out 3, out 2)
    "dense_general": ({"proj/kernel": P("fsdp", None, "tensor", "data")},
                      {"proj/kernel": (P("fsdp", None, None), P(None, "tensor", "data"))}),
    # kernel (batch 3, in 5, out 6)
    "dense_general_batch_dims": ({"proj/kernel": P("data", "fsdp", "tensor")},
                                 {"proj/kernel": (P("data", "fsdp", None), P("data", None, "tensor"))}),
    # "ndh" with n: out, d: in, h: out -- output axes on both sides of the input axis
    "einsum_interleaved": ({"proj/kernel": P("tensor", "fsdp", "data")},
                           {"proj/kernel": (P("fsdp", None), P(None, "tensor", "data"))}),
    # "ndh" with n: batch (per head), d: in, h: out
    "einsum_per_head": ({"proj/kernel": P("tensor", "fsdp", None)},
                        {"proj/kernel": (P("tensor", "fsdp", None), P("tensor", None, None))}),
    # HWIO
    "conv": ({"conv/kernel": P(None, None, "fsdp", "tensor")},
             {"conv/kernel": (P(None, None, "fsdp", None), P(None, "tensor"))}),
    "embed_tied": ({"embed/embedding": P("tensor", "fsdp")},
                   {"embed/embedding": (P("tensor", None), P(None, "fsdp"))}),
    # stacked (3 layers) and a plain head; a replicated kernel gives replicated factors
    "scan_remat": ({"layers/fc/kernel": P(None, "fsdp", "tensor"), "head/kernel": P()},
                   {"layers/fc/kernel": (P(None, "fsdp", None), P(None, None, "tensor")),
                    "head/kernel": (P(), P())}),
    "vmap": ({"members/kernel": P("data", "fsdp", "tensor")},
             {"members/kernel": (P("data", "fsdp", None), P("data", None, "tensor"))}),
}


def _numpy_like(abstract, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype), abstract)


def _nest(flat):
  out = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adapter_specs_match_hand_written_specs(case):
  kernel_specs, factor_specs = EXPECTED[case.name]
  params = jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"]
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=2))
  adapters = jax.eval_shape(lambda: lora.init(jax.random.key(1), params, *case.inputs))
  specs = jax.tree.map(lambda _: P(), params)
  for path, spec in kernel_specs.items():
    node = specs
    *parents, last = path.split("/")
    for key in parents:
      node = node[key]
    node[last] = spec
  got = sharding.adapter_specs(adapters, specs, lora.targets)
  assert got == _nest({path: {"lora_a": a, "lora_b": b} for path, (a, b) in factor_specs.items()})


def test_adapter_specs_errors():
  case = next(c for c in CASES if c.name == "scan_remat")
  params = jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"]
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=2))
  adapters = jax.eval_shape(lora.init, jax.random.key(1), params, *case.inputs)
  specs = jax.tree.map(lambda _: P(), params)
  with pytest.raises(JloraError, match="'layers/fc/kernel' has 2 entries"):
    sharding.adapter_specs(adapters, {**specs, "layers": {"fc": {"kernel": P("fsdp", "tensor")}}}, lora.targets)
  with pytest.raises(JloraError, match="'head/kernel' is not among the targets"):
    sharding.adapter_specs(adapters, specs, {"layers/fc/kernel": lora.targets["layers/fc/kernel"]})
  with pytest.raises(JloraError, match="no spec for the kernel 'head/kernel'"):
    sharding.adapter_specs(adapters, {"layers": specs["layers"]}, lora.targets)
  bad = {**adapters, "head": {"kernel": {**adapters["head"]["kernel"], "magnitude": np.ones(2)}}}
  with pytest.raises(JloraError, match="leaves outside"):
    sharding.adapter_specs(bad, specs, lora.targets)
  wrong_rank = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=3))
  wrong_rank.trace(params, *case.inputs)
  with pytest.raises(JloraError, match=r"kernel/lora_a' has shape \((3, )?4, 2\), but its target needs \((3, )?4, 3\)"):
    sharding.adapter_specs(adapters, specs, wrong_rank.targets)


# Cheap XLA:CPU compiles (these tests check values, not speed): several times faster on the small test machines.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Heads(nn.Module):
  """An interleaved einsum kernel (n: out, d: in, h: out) and a multi-axis DenseGeneral, with shapes a 2x4 mesh splits."""

  @nn.compact
  def __call__(self, x_btd):
    q_btnh = nn.Einsum((4, 8, 2), "btd,ndh->btnh", name="q")(x_btd)
    return nn.DenseGeneral(8, axis=(-2, -1), name="out")(jnp.tanh(q_btnh))


def test_interleaved_and_multi_axis_kernels_run_sharded(tmp_path):
  model, x = Heads(), np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
  params = _numpy_like(jax.eval_shape(model.init, jax.random.key(1), x)["params"], 1, 0.3)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2))
  adapters = _numpy_like(jax.eval_shape(lora.init, jax.random.key(2), params, x), 2, 0.3)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  rules = [("q/kernel", P("tensor", "fsdp", None)), ("out/kernel", P("tensor", None, "fsdp")), (".*/bias", P())]
  specs = sharding.param_specs(params, rules, mesh)
  aspecs = sharding.adapter_specs(adapters, specs, lora.targets)
  assert aspecs == {"q": {"kernel": {"lora_a": P("fsdp", None), "lora_b": P(None, "tensor", None)}},
                    "out": {"kernel": {"lora_a": P("tensor", None, None), "lora_b": P(None, "fsdp")}}}
  ashardings = sharding.named(aspecs, mesh)

  # Created under jit with these out_shardings, and restored from a checkpoint onto them.
  created = jax.jit(lambda key: lora.init(key, params, x), out_shardings=ashardings, compiler_options=FAST)(
      jax.random.key(2))
  jlora.save_adapters(tmp_path / "a", adapters, lora.config)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), adapters, ashardings)
  restored, _ = jlora.load_adapters(tmp_path / "a", target)
  for tree in (created, restored):
    assert jax.tree.map(lambda v: v.sharding, tree) == ashardings
  chex.assert_trees_all_equal(restored, adapters)

  def loss(adapters, params, x):
    return jnp.mean(lora.apply(params, adapters, x) ** 2)

  sharded = jax.jit(jax.value_and_grad(loss), in_shardings=(ashardings, sharding.named(specs, mesh), None),
                    out_shardings=(None, ashardings), compiler_options=FAST)
  value, grads = sharded(restored, sharding.shard(params, sharding.named(specs, mesh)), x)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(adapters, params, x)
  chex.assert_trees_all_close((value, grads), (ref_value, ref_grads), atol=1e-5, rtol=1e-5)
  assert jax.tree.map(lambda v: v.sharding, grads) == ashardings


def test_tree_shardings_like_follows_params_through_optax_states():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  trainable = {"lora": {"w": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 8))}}, "head": {"b": jnp.zeros(3)}}
  specs = {"lora": {"w": {"lora_a": P("fsdp", None), "lora_b": P(None, "tensor")}}, "head": {"b": P(None)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), jlora.lora_plus(optax.adamw, 1e-3, others="train"))
  state = {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key(0)}
  shardings = sharding.tree_shardings_like(jax.eval_shape(lambda: state), specs, mesh)
  flat = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  a_leaves = {k: v for k, v in flat.items() if k.endswith("['lora']['w']['lora_a']")}
  b_leaves = {k: v for k, v in flat.items() if k.endswith("['lora']['w']['lora_b']")}
  assert len(a_leaves) >= 3 and set(a_leaves.values()) == {P("fsdp", None)}  # param, mu, nu
  assert len(b_leaves) >= 3 and set(b_leaves.values()) == {P(None, "tensor")}
  others = {k: v for k, v in flat.items() if k not in a_leaves and k not in b_leaves and "['head']" not in k}
  assert others and set(others.values()) == {P()}  # counts, step, rng
  placed = jax.device_put(state, shardings)
  assert placed["trainable"]["lora"]["w"]["lora_a"].sharding == NamedSharding(mesh, P("fsdp", None))


def test_tree_shardings_like_replicates_leaves_the_spec_does_not_fit():
  mesh = sharding.make_mesh({"fsdp": 8})
  specs = {"w": P("fsdp", None)}
  tree = {"mu": {"w": jnp.zeros((8, 4))}, "v_row": {"w": jnp.zeros((4,))}, "v_odd": {"w": jnp.zeros((3, 4))}}
  shardings = sharding.tree_shardings_like(tree, specs, mesh)
  assert shardings["mu"]["w"].spec == P("fsdp", None)
  assert shardings["v_row"]["w"].spec == P()
  assert shardings["v_odd"]["w"].spec == P()


# --- a LoRA train step of a small Llama on four mesh shapes ------------------------------------------------------

CONFIG = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
MESHES = {"1x1": (1, 1, 1), "8x1_data": (8, 1, 1), "2x4_fsdp_tensor": (1, 2, 4), "1x8_tensor": (1, 1, 8)}
# mesh -> the shape of every device's block: q_proj A (layers, hidden 32, r 4) and B (layers, r, 4 heads x 8),
# down_proj A (layers, intermediate 64, r) and B (layers, r, hidden 32), and the (8, 8) batch of token ids.
SHARD_SHAPES = {
    "1x1": {"q_a": {(2, 32, 4)}, "q_b": {(2, 4, 32)}, "down_a": {(2, 64, 4)}, "down_b": {(2, 4, 32)}, "ids": {(8, 8)}},
    "8x1_data": {"q_a": {(2, 32, 4)}, "q_b": {(2, 4, 32)}, "down_a": {(2, 64, 4)}, "down_b": {(2, 4, 32)},
                 "ids": {(1, 8)}},
    "2x4_fsdp_tensor": {"q_a": {(2, 16, 4)}, "q_b": {(2, 4, 8)}, "down_a": {(2, 16, 4)}, "down_b": {(2, 4, 16)},
                        "ids": {(4, 8)}},
    "1x8_tensor": {"q_a": {(2, 32, 4)}, "q_b": {(2, 4, 4)}, "down_a": {(2, 8, 4)}, "down_b": {(2, 4, 32)},
                   "ids": {(8, 8)}},
}


@pytest.fixture(scope="module")
def llama_run():
  """A small Llama (scanned layers), LoRA on every projection, an AdamW step; and its single-device result.

  Trees are built as numpy arrays (nothing to compile) and placed with device_put.
  """
  model = models.LlamaForCausalLM(CONFIG)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CONFIG.vocab_size, (8, 8)).astype(np.int32)
  mask = np.ones((8, 8), np.int32)
  mask[:2, :3] = 0  # left padding in two rows
  params = _numpy_like(jax.eval_shape(model.init, jax.random.key(1), ids)["params"], 1, 0.2)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)/kernel",
                                            rank=4, alpha=8.0))
  # Random A and B: B = 0 would hide a wrongly sharded B.
  adapters = _numpy_like(jax.eval_shape(lora.init, jax.random.key(2), params, ids, mask), 2, 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))

  def init_state(trainable):
    return {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(3)}

  def step(state, params, batch):
    rng, _ = jax.random.split(state["rng"])

    def loss_fn(trainable):
      logits = lora.apply(params, trainable["lora"], batch["ids"], batch["mask"])
      logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      nll = -jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)[..., 0]
      weights = batch["mask"][:, 1:]
      return jnp.sum(nll * weights) / jnp.sum(weights)

    loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    return {"trainable": optax.apply_updates(state["trainable"], updates), "opt_state": opt_state,
            "step": state["step"] + 1, "rng": rng}, loss

  abstract_state = jax.eval_shape(init_state, {"lora": adapters})
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state["opt_state"])
  state = {"trainable": {"lora": adapters}, "opt_state": state, "step": np.zeros((), np.int32),
           "rng": jax.random.key(3)}
  batch = {"ids": ids, "mask": mask}
  device = jax.devices()[0]
  reference = jax.jit(step, compiler_options=FAST)(*jax.device_put((state, params, batch), device))
  return model, lora, params, adapters, abstract_state, state, step, batch, reference


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_train_step_equals_single_device(llama_run, mesh_name):
  model, lora, params, adapters, abstract_state, state, step, batch, (ref_state, ref_loss) = llama_run

  data, fsdp, tensor = MESHES[mesh_name]
  mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                            devices=jax.devices()[: data * fsdp * tensor])
  specs = sharding.param_specs(params, sharding.rules_for(model), mesh)
  trainable_specs = {"lora": sharding.adapter_specs(adapters, specs, lora.targets)}
  state_shardings = sharding.tree_shardings_like(abstract_state, trainable_specs, mesh)
  param_shardings = sharding.named(specs, mesh)
  batch_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P(("data", "fsdp"), None)), batch)
  sharded_step = jax.jit(step, in_shardings=(state_shardings, param_shardings, batch_shardings),
                         out_shardings=(state_shardings, NamedSharding(mesh, P())), compiler_options=FAST)
  state, loss = sharded_step(jax.device_put(state, state_shardings), sharding.shard(params, param_shardings),
                             jax.device_put(batch, batch_shardings))

  chex.assert_trees_all_close(loss, ref_loss, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(state["trainable"], ref_state["trainable"], atol=1e-5, rtol=0)
  assert jax.tree.map(lambda v: v.sharding, state["trainable"]) == sharding.named(trainable_specs, mesh)
  q_a = state["trainable"]["lora"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]["lora_a"]
  assert q_a.sharding.spec == P(None, "fsdp", None)
  # Each device holds the block the mesh gives it, written out per mesh: an axis of size > 1 really splits
  # (fsdp: A of q (input axis) and B of down_proj (output axis); tensor: B of q and A of down_proj), and data
  # parallelism splits the batch but never an adapter.
  layers = state["trainable"]["lora"]["model"]["layers"]
  got = {name: {shard.data.shape for shard in leaf.addressable_shards} for name, leaf in {
      "q_a": q_a, "q_b": layers["self_attn"]["q_proj"]["kernel"]["lora_b"],
      "down_a": layers["mlp"]["down_proj"]["kernel"]["lora_a"],
      "down_b": layers["mlp"]["down_proj"]["kernel"]["lora_b"], "ids": jax.device_put(batch, batch_shardings)["ids"],
  }.items()}
  assert got == SHARD_SHAPES[mesh_name]
  assert np.isfinite(float(loss))
  assert not np.allclose(state["trainable"]["lora"]["model"]["layers"]["self_attn"]["v_proj"]["kernel"]["lora_a"],
                         adapters["model"]["layers"]["self_attn"]["v_proj"]["kernel"]["lora_a"])
