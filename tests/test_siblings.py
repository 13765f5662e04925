"""Sibling grouping (jlora._siblings): modules reading one input share one ``x @ [A_1 | ... | A_n]`` matmul.

Every test compares the grouped computation with a float64 numpy re-derivation or with the same ``Lora`` built
with ``group_siblings=False``, and counts the matmuls to show that grouping did (or did not) happen.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import models, sharding

ALPHA = 4.0
# Grouped and ungrouped differ only in how XLA blocks the down-projection's sums: float32 reassociation.
CLOSE = dict(atol=2e-6, rtol=2e-6)


class Siblings(nn.Module):
  """q, k, v read ``x`` (k reads ``other`` when given); o reads their concatenation."""

  @nn.compact
  def __call__(self, x, other=None):
    q = nn.Dense(6, name="q")(x)
    k = nn.Dense(5, name="k")(x if other is None else other)
    v = nn.Dense(4, use_bias=False, name="v")(x)
    return nn.Dense(3, name="o")(jnp.concatenate([q, k, v], axis=-1))


def _dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def _trained(adapters, seed=3):
  """Non-zero A and B (B = 0 would hide a wrong slice)."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


@pytest.fixture(scope="module")
def siblings():
  model = Siblings()
  x = jax.random.normal(jax.random.key(0), (2, 7, 8))
  params = model.init(jax.random.key(1), x)["params"]
  # Unequal ranks: the group's factors are concatenated along ranks 2, 3 and 2.
  config = jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=ALPHA, rank_pattern={r"k/kernel": 3})
  grouped, plain = jlora.Lora(model, config), jlora.Lora(model, config, group_siblings=False)
  adapters = _trained(grouped.init(jax.random.key(2), params, x))
  plain.trace(params, x)
  return model, params, adapters, grouped, plain, x


def _reference(params, adapters, x, other=None):
  """``Siblings`` with LoRA on every kernel, in float64 numpy."""
  def dense(name, v):
    p, a = params[name], adapters[name]["kernel"]
    w, lora_a, lora_b = (np.asarray(t, np.float64) for t in (p["kernel"], a["lora_a"], a["lora_b"]))
    y = v @ w + (ALPHA / lora_a.shape[-1]) * (v @ lora_a) @ lora_b
    return y + np.asarray(p["bias"], np.float64) if "bias" in p else y

  x = np.asarray(x, np.float64)
  k_in = x if other is None else np.asarray(other, np.float64)
  return dense("o", np.concatenate([dense("q", x), dense("k", k_in), dense("v", x)], axis=-1))


def test_trace_records_modules_reading_one_input(siblings):
  _, _, _, grouped, plain, _ = siblings
  assert grouped._groups == {(name,): ("q", "k", "v") for name in ("q", "k", "v")}
  llama = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     num_key_value_heads=1, scan_layers=False))
  ids = jnp.zeros((1, 4), jnp.int32)
  lora = jlora.Lora(llama, jlora.LoraConfig(targets=r".*_proj/kernel", rank=2))
  lora.trace(jax.eval_shape(llama.init, jax.random.key(0), ids)["params"], ids)
  groups = {"/".join(path): names for path, names in lora._groups.items()}
  assert groups == {f"model/layers_{i}/{block}/{name}": names for i in range(2)
                    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
                    for name in names}


def test_grouped_equals_reference_and_ungrouped_with_gradients(siblings):
  _, params, adapters, grouped, plain, x = siblings
  out = grouped.apply(params, adapters, x)
  np.testing.assert_allclose(out, _reference(params, adapters, x), rtol=1e-5, atol=1e-5)

  def loss(lora):
    return lambda a, x: jnp.sum(jnp.sin(lora.apply(params, a, x)))

  chex.assert_trees_all_close(jax.grad(loss(grouped), argnums=(0, 1))(adapters, x),
                              jax.grad(loss(plain), argnums=(0, 1))(adapters, x), **CLOSE)
  # Four base matmuls, four up-projections; the down-projections: one for q/k/v, one for o (not three + one).
  assert _dots(grouped.apply, params, adapters, x) == 4 + 4 + 2
  assert _dots(plain.apply, params, adapters, x) == 4 + 4 + 4


def test_a_sibling_called_on_another_input_computes_its_own(siblings):
  _, params, adapters, grouped, plain, x = siblings
  other = jax.random.normal(jax.random.key(5), x.shape)
  out = grouped.apply(params, adapters, x, other)
  np.testing.assert_allclose(out, _reference(params, adapters, x, other), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.grad(lambda a: jnp.sum(grouped.apply(params, a, x, other) ** 2))(adapters),
                              jax.grad(lambda a: jnp.sum(plain.apply(params, a, x, other) ** 2))(adapters), **CLOSE)
  # q/v still share one down-projection (the traced group computed for x); k and o compute their own.
  assert _dots(grouped.apply, params, adapters, x, other) == 4 + 4 + 3


def test_dropout_and_other_variants_are_not_grouped(siblings):
  model, params, adapters, grouped, plain, x = siblings
  rngs = {"dropout": jax.random.key(4)}
  config = jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=ALPHA, rank_pattern={r"k/kernel": 3}, dropout=0.5)
  dropped, dropped_plain = jlora.Lora(model, config), jlora.Lora(model, config, group_siblings=False)
  dropped.trace(params, x)
  dropped_plain.trace(params, x)
  # Each module draws its own mask, so the siblings' inputs differ: computed per module, as without grouping.
  chex.assert_trees_all_close(dropped.apply(params, adapters, x, rngs=rngs),
                              dropped_plain.apply(params, adapters, x, rngs=rngs), atol=0, rtol=0)
  assert _dots(lambda a: dropped.apply(params, a, x, rngs=rngs), adapters) == 4 + 8
  dora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2, use_dora=True))
  dora_adapters = dora.init(jax.random.key(6), params, x)
  assert dora._groups
  dora_plain = jlora.Lora(model, dora.config, group_siblings=False)
  assert (_dots(dora.apply, params, dora_adapters, x)
          == _dots(lambda *a: dora_plain.apply(*a), params, dora_adapters, x))


def test_llama_grouped_under_scan_and_remat_equals_ungrouped():
  scan, remat = True, "full"
  llama = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2, scan_layers=scan, remat=remat))
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = llama.init(jax.random.key(1), ids)["params"]
  config = jlora.LoraConfig(targets=r".*_proj/kernel", rank=4, alpha=8.0)
  grouped, plain = jlora.Lora(llama, config), jlora.Lora(llama, config, group_siblings=False)
  adapters = _trained(grouped.init(jax.random.key(2), params, ids))
  plain.trace(params, ids)

  def value_and_grad(lora):
    return jax.jit(jax.value_and_grad(lambda a: jnp.mean(jax.nn.log_softmax(lora.apply(params, a, ids)) ** 2)))

  chex.assert_trees_all_close(value_and_grad(grouped)(adapters), value_and_grad(plain)(adapters), **CLOSE)
  # q/k/v and gate/up each one down-projection (7 -> 4) in the scanned layer body.
  assert _dots(lambda a: grouped.apply(params, a, ids), adapters) == _dots(
      lambda a: plain.apply(params, a, ids), adapters) - 3


def test_grouped_sharded_equals_ungrouped_single_device(siblings):
  _, params, adapters, grouped, plain, x = siblings
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  # x's batch over fsdp; the grouped factors (q/k/v's A) split along their input axis (8 / 4), o's replicated.
  specs = {name: {"kernel": {"lora_a": P("tensor" if name != "o" else None, None), "lora_b": P(None, None)}}
           for name in adapters}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
  x_sharding = NamedSharding(mesh, P("fsdp", None, None))

  def loss(lora):
    return lambda a, x: jnp.sum(jnp.tanh(lora.apply(params, a, x)))

  sharded = jax.jit(jax.value_and_grad(loss(grouped)), in_shardings=(shardings, x_sharding))
  got = sharded(jax.device_put(adapters, shardings), jax.device_put(x, x_sharding))
  # A sharded contraction sums its partial products across devices in another order: gradients of order 10 move
  # by a few 1e-6.
  chex.assert_trees_all_close(got, jax.jit(jax.value_and_grad(loss(plain)))(adapters, x), atol=2e-5, rtol=2e-6)
