"""The conformance suite every module kind (and later every variant) must pass."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import CASES, OneDense, ScannedStack

import jlora

ALPHA, RANK = 6.0, 2
SCALE = ALPHA / RANK


def _setup(case, **config_kwargs):
  params = case.model.init(jax.random.key(0), *case.inputs)["params"]
  config = jlora.LoraConfig(targets=case.targets, rank=RANK, alpha=ALPHA, **config_kwargs)
  lora = jlora.Lora(case.model, config)
  adapters = lora.init(jax.random.key(1), params, *case.inputs)
  return params, lora, adapters


def _nonzero_b(adapters, seed=2):
  """B = 0 hides bugs: give every factor random values."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)])


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
  return request.param


def test_adapter_layout(case):
  params, lora, adapters = _setup(case)
  for path, target in lora.targets.items():
    node = adapters
    for key in path.split("/"):
      node = node[key]
    assert set(node) == {"lora_a", "lora_b"}
    assert node["lora_a"].shape == target.stack_shape + target.layout.a_shape(RANK)
    assert node["lora_b"].shape == target.stack_shape + target.layout.b_shape(RANK)
    assert node["lora_a"].dtype == jnp.float32 and not np.any(np.asarray(node["lora_b"]))


def test_identity_at_init(case):
  params, lora, adapters = _setup(case)
  base = case.model.apply({"params": params}, *case.inputs)
  chex.assert_trees_all_equal(lora.apply(params, adapters, *case.inputs), base)


def test_matches_numpy_formula(case):
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)
  got = lora.apply(params, adapters, *case.inputs)
  want = case.reference(params, adapters, SCALE, *case.inputs)
  base = case.model.apply({"params": params}, *case.inputs)
  assert np.abs(np.asarray(base) - want).max() > 1e-2, "the adapter must change the output"
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_gradients_only_for_adapters(case):
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)

  def loss(adapters, params):
    return jnp.sum(jnp.square(lora.apply(params, adapters, *case.inputs)))

  grads = jax.grad(loss)(adapters, params)
  chex.assert_trees_all_equal_structs(grads, adapters)
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # The frozen tree is an input only: its cotangent is never requested, so XLA never builds it.
  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters, params)
  out_shapes = {tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars}
  assert out_shapes == {tuple(v.shape) for v in jax.tree.leaves(adapters)}


def test_jit_equals_eager(case):
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)
  eager = lora.apply(params, adapters, *case.inputs)
  jitted = jax.jit(lambda p, a, *x: lora.apply(p, a, *x))(params, adapters, *case.inputs)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_merge_and_unmerge(case):
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)
  merged = lora.merge(params, adapters)
  chex.assert_trees_all_equal_structs(merged, params)
  chex.assert_trees_all_close(case.model.apply({"params": merged}, *case.inputs),
                              lora.apply(params, adapters, *case.inputs), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lora.unmerge(merged, adapters), params, rtol=1e-6, atol=1e-6)
  # Only the targeted kernels change; everything else is the very same array.
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    joined = "/".join(k.key for k in path)
    merged_leaf = merged
    for k in path:
      merged_leaf = merged_leaf[k.key]
    assert (joined in lora.targets) != (merged_leaf is leaf)


def test_bf16_base_with_fp32_adapters(case):
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)
  params_bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  got = lora.apply(params_bf16, adapters, *case.inputs)
  want = case.reference(params_bf16, adapters, SCALE, *case.inputs)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2)

  grads = jax.grad(lambda a: jnp.sum(lora.apply(params_bf16, a, *case.inputs).astype(jnp.float32)))(adapters)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  merged = lora.merge(params_bf16, adapters)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(merged))
  chex.assert_trees_all_close(case.model.apply({"params": merged}, *case.inputs).astype(jnp.float32),
                              got.astype(jnp.float32), rtol=5e-2, atol=5e-2)


def test_bf16_compute_dtype():
  """A module computing in bf16 runs the adapter path in bf16 too, while A/B stay fp32."""
  model = nn.Dense(8, dtype=jnp.bfloat16, name="proj")
  x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4, alpha=4.0))
  adapters = _nonzero_b(lora.init(jax.random.key(1), params, x))
  y = lora.apply(params, adapters, x)
  assert y.dtype == jnp.bfloat16
  p, a = jax.tree.map(np.asarray, (params, adapters["kernel"]))
  want = x @ p["kernel"] + p["bias"] + (x @ a["lora_a"]) @ a["lora_b"]
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)


class TestDropout:
  """Adapter dropout: only with an rng, only on the adapter path."""

  def _setup(self, model_cls=OneDense, shape=(2, 3, 4)):
    model = model_cls()
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*kernel", rank=RANK, alpha=ALPHA, dropout=0.5))
    return model, x, params, lora, lora.init(jax.random.key(1), params, x)

  def test_inactive_without_rng(self):
    model, x, params, lora, adapters = self._setup()
    adapters = _nonzero_b(adapters)
    no_dropout = jlora.Lora(model, jlora.LoraConfig(targets=r".*kernel", rank=RANK, alpha=ALPHA))
    chex.assert_trees_all_equal(lora.apply(params, adapters, x), no_dropout.apply(params, adapters, x))

  def test_active_with_rng_and_matches_masked_formula(self):
    model, x, params, lora, adapters = self._setup()
    adapters = _nonzero_b(adapters)
    rng = jax.random.key(7)
    y = lora.apply(params, adapters, x, rngs={"dropout": rng})
    assert not np.allclose(y, lora.apply(params, adapters, x))
    # y = base + s * (x_drop @ A) @ B with x_drop elementwise in {0, x / (1 - p)}: find such a mask for
    # every row by enumerating the 2^4 possibilities.
    p, ad = jax.tree.map(np.asarray, (params["proj"], adapters["proj"]["kernel"]))
    a, b = ad["lora_a"], ad["lora_b"]
    base = x @ p["kernel"] + p["bias"]
    update = ((np.asarray(y) - base) / SCALE).reshape(-1, b.shape[-1])
    masks = np.array([[(bits >> i) & 1 for i in range(x.shape[-1])] for bits in range(2 ** x.shape[-1])])
    for row, x_row in zip(update, x.reshape(-1, x.shape[-1])):
      errors = [np.abs(((x_row * keep * 2.0) @ a) @ b - row).max() for keep in masks]
      assert min(errors) < 1e-4

  def test_no_effect_on_frozen_path(self):
    model, x, params, lora, adapters = self._setup()  # B = 0: output must equal the base exactly
    chex.assert_trees_all_equal(lora.apply(params, adapters, x, rngs={"dropout": jax.random.key(3)}),
                                model.apply({"params": params}, x))

  def test_explicit_switches(self):
    model, x, params, lora, adapters = self._setup()
    adapters = _nonzero_b(adapters)
    rngs = {"dropout": jax.random.key(3)}
    chex.assert_trees_all_equal(lora.apply(params, adapters, x, rngs=rngs, lora_dropout=False),
                                lora.apply(params, adapters, x))
    with pytest.raises(jlora.JloraError, match="dropout"):
      lora.apply(params, adapters, x, lora_dropout=True)

  def test_scan_layers_get_different_masks(self):
    model, x, params, lora, adapters = self._setup(ScannedStack, (2, 4))
    adapters = _nonzero_b(adapters)
    y1 = lora.apply(params, adapters, x, rngs={"dropout": jax.random.key(1)})
    y2 = lora.apply(params, adapters, x, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, y2)


def test_apply_fn_has_model_apply_signature():
  case = CASES[0]
  params, lora, adapters = _setup(case)
  adapters = _nonzero_b(adapters)
  fn = lora.apply_fn(adapters)
  chex.assert_trees_all_equal(fn({"params": params}, *case.inputs), lora.apply(params, adapters, *case.inputs))


def test_init_from_abstract_params():
  """Targets and adapters can be created without materialising the base (e.g. before sharded loading)."""
  case = CASES[-2]
  params, lora, adapters = _setup(case)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
  lora2 = jlora.Lora(case.model, lora.config)
  adapters2 = lora2.init(jax.random.key(1), abstract, *case.inputs)
  chex.assert_trees_all_equal(adapters2, adapters)
  assert lora2.targets == lora.targets
