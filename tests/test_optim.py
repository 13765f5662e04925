"""optax routing: adapters_only (frozen leaves carry no state) and LoRA+."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
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


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_plus_groups_like_peft(use_dora, tmp_path):
  """Each adapter leaf gets the learning rate PEFT's create_loraplus_optimizer gives the same parameter: A at lr,
  B and one-dimensional leaves (DoRA's magnitude, on an embedding too) at lr * ratio, an embedding's factors at
  loraplus_lr_embedding."""
  from peft.optimizers import create_loraplus_optimizer
  from test_models_references import save_hf, tiny_hf_model

  import jlora.peft
  from jlora import models
  from jlora.peft._modules import module_table

  lr, ratio, lr_embedding = 0.1, 4.0, 0.05
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.get_peft_model(tiny_hf_model("llama"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=use_dora))
    optimizer = create_loraplus_optimizer(peft_model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_lr_embedding=lr_embedding)
    peft_model.save_pretrained(tmp_path / "adapter")
  group_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
  peft_lrs = {name: group_lr[id(p)] for name, p in peft_model.named_parameters() if p.requires_grad}

  model, params = models.from_pretrained(save_hf(tiny_hf_model("llama"), tmp_path / "base"), scan_layers=False)
  adapters, _ = jlora.peft.from_pretrained(tmp_path / "adapter", model, params, policy=jlora.LoadPolicy(
      allow_missing_fingerprint=True, max_relative_update=1e9))
  tx = jlora.lora_plus(optax.sgd, lr, ratio=ratio, lr_embedding=lr_embedding)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, adapters), tx.init(adapters))
  ours = {"/".join(k.key for k in path): -float(np.unique(np.asarray(u))[0])
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}

  table = module_table(model.config)
  names = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b",
           "lora_magnitude_vector": "lora_magnitude"}
  theirs = {}
  for name, value in peft_lrs.items():
    module, leaf = next((name.split(f".{k}")[0], v) for k, v in names.items() if f".{k}." in name or name.endswith(k))
    theirs[f"{table.by_name[module.removeprefix('base_model.model.')].path}/{leaf}"] = value
  assert ours == pytest.approx(theirs)
  assert set(theirs.values()) == ({lr, ratio * lr, lr_embedding})
