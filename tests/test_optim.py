"""optax routing: adapters_only (frozen leaves carry no state) and LoRA+."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cases import ScannedStack

import jlora

X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)


def _setup():
  model = ScannedStack()
  params = model.init(jax.random.key(0), X)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2))
  return model, params, lora, lora.init(jax.random.key(1), params, X)


def _nbytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes"))


def test_labels():
  _, params, _, adapters = _setup()
  labels = jlora.adapter_labels({"params": params, "lora": adapters})
  assert set(jax.tree.leaves(labels["params"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["lora"])) == {"adapter"}


def test_adapters_only_state_bytes_equal_adapter_tree_alone():
  model = nn.Dense(256)
  x = np.ones((1, 256), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  adapters = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4)).init(jax.random.key(1), params, x)
  combined = {"params": params, "lora": adapters}
  tx = jlora.adapters_only(optax.adam(1e-2))
  assert _nbytes(tx.init(combined)) == _nbytes(optax.adam(1e-2).init(adapters))
  assert _nbytes(tx.init(combined)) < _nbytes(optax.adam(1e-2).init(combined)) / 10


def test_adapters_only_trains_only_adapters():
  model, params, lora, adapters = _setup()
  target = np.ones((8, 2), np.float32)

  def loss(tree):  # grads for *everything*, as a naive combined-tree loop would compute them
    return jnp.mean(jnp.square(lora.apply(tree["params"], tree["lora"], X) - target))

  combined = {"params": params, "lora": adapters}
  tx = jlora.adapters_only(optax.adam(1e-2))
  state = tx.init(combined)
  losses = []
  for _ in range(5):
    value, grads = jax.value_and_grad(loss)(combined)
    assert np.abs(grads["params"]["head"]["kernel"]).max() > 0  # the frozen grads exist here ...
    updates, state = tx.update(grads, state, combined)
    combined = optax.apply_updates(combined, updates)
    losses.append(float(value))
  chex.assert_trees_all_equal(combined["params"], params)  # ... and are ignored, bitwise
  assert losses[-1] < losses[0]
  assert not np.allclose(combined["lora"]["head"]["kernel"]["lora_b"], 0)


def test_lora_plus_ratio():
  _, params, _, adapters = _setup()
  grads = jax.tree.map(jnp.ones_like, {"params": params, "lora": adapters})
  for lr in (0.1, optax.constant_schedule(0.1)):
    tx = jlora.lora_plus(optax.sgd, lr, ratio=4.0)
    updates, _ = tx.update(grads, tx.init(grads))
    head = updates["lora"]["head"]["kernel"]
    np.testing.assert_allclose(head["lora_a"], -0.1 * np.ones_like(head["lora_a"]), rtol=1e-6)
    np.testing.assert_allclose(head["lora_b"], -0.4 * np.ones_like(head["lora_b"]), rtol=1e-6)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["params"]))


def test_lora_plus_can_train_non_adapter_leaves():
  """others="train" groups the other leaves as PEFT groups other trainable parameters: one-dimensional ones
  (biases, norm scales) at lr * ratio, the rest at lr."""
  tree = {"head": {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))},
          "lora": {"k": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3))}}}
  grads = jax.tree.map(jnp.ones_like, tree)
  tx = jlora.lora_plus(optax.sgd, 0.1, ratio=2.0, others="train")
  updates, _ = tx.update(grads, tx.init(tree))
  np.testing.assert_allclose(updates["head"]["w"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["b"], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["lora"]["k"]["lora_a"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["lora"]["k"]["lora_b"], -0.2, rtol=1e-6)
