"""The variant interface itself, with a toy variant registered by the test: shared frozen state, registration,
and everything that must learn a variant's leaves without knowing the variant (optax, sharding, checkpoints).

The toy variant is VeRA-shaped: one shared frozen projection ``P`` (sized to the largest targeted ``fan_in``,
sliced per kernel, drawn from the init key) and trainable ``toy_d`` (rank) and ``toy_b`` (rank x out):
``y = base(x) + s * (x @ (P[:fan_in] * d)) @ b``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import ScannedStack, StridedConv
from flax import nnx
from jax.sharding import PartitionSpec as P

import jlora
import jlora.nnx
from jlora import sharding, variants
from jlora._variant import Call, Variant
from jlora.variants._lora import factor_norms

RANK, ALPHA = 2, 6.0
SCALE = ALPHA / RANK


def _factors(adapter, target, state):
  """The toy's A (``batch + in + (r,)``): the shared projection's first ``fan_in`` rows, scaled by ``d``."""
  layout = target.layout
  d = adapter["toy_d"]
  proj = state["p"][:layout.fan_in]
  a = proj.reshape((1,) * (d.ndim - 1) + proj.shape) * d[..., None, :]
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  lead = adapter["toy_d"].shape[:-1]  # stacked layers, when merging
  return jnp.broadcast_to(a.reshape(lead + (1,) * len(batch) + in_shape + (RANK,)), lead + batch + in_shape + (RANK,))


def _init(key, target, config, kernel):
  layout = target.layout
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  return {"toy_d": jnp.ones(target.stack_shape + (RANK,)),
          "toy_b": jnp.zeros(target.stack_shape + batch + (RANK,) + tuple(layout.shape[i] for i in layout.out_axes))
          }, kernel


def _apply(adapter, call: Call):
  out = call.base()
  return out + call.low_rank(_factors(adapter, call.target, call.state), call.target.scale * adapter["toy_b"])


def _delta(adapter, target, state):
  return target.layout.delta(_factors(adapter, target, state), adapter["toy_b"])


TOY = Variant(
    name="toy",
    leaf_names=("toy_d", "toy_b"),
    leaves=lambda t: {"toy_d": (None,), "toy_b": t.layout.batch_axes + (None,) + t.layout.out_axes},
    init=_init,
    apply=_apply,
    merge=lambda w, a, t, state: ((w + t.scale * _delta(a, t, state)).astype(w.dtype), None),
    unmerge=lambda w, a, t, state, memo: (w - t.scale * _delta(a, t, state)).astype(w.dtype),
    update_norms=lambda w, a, t, state: abs(t.scale) * factor_norms(_factors(a, t, state), a["toy_b"], t),
    vector_leaves=("toy_d",),
    init_state=lambda key, targets, config: {
        "p": jax.random.normal(key, (max(t.layout.fan_in for t in targets.values()), RANK))},
)


@pytest.fixture(autouse=True)
def registered():
  variants.register("toy", lambda config: TOY, (TOY,))
  yield
  variants.unregister("toy", (TOY,))


def _randomized(adapters, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: v + 0.5 * rng.normal(size=v.shape).astype(np.float32), adapters)


def _np_toy(p, a, state, s, x):
  """ScannedStack by hand: three tanh(Dense) layers then a Dense head, each with the toy adapter."""
  p, a, proj = jax.tree.map(lambda v: np.asarray(v, np.float64), (p, a, state["p"]))

  def dense(w, b, node, x):
    return x @ w + b + s * (x @ (proj[:w.shape[0]] * node["toy_d"])) @ node["toy_b"]

  layers, head = p["layers"]["fc"], p["head"]
  for i in range(3):
    node = jax.tree.map(lambda v, i=i: v[i], a["layers"]["fc"]["kernel"])
    x = np.tanh(dense(layers["kernel"][i], layers["bias"][i], node, x))
  return dense(head["kernel"], head["bias"], a["head"]["kernel"], x)


def test_shared_state_rides_in_params_through_scan_and_merge():
  model, x = ScannedStack(), np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
  original = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets=r".*/kernel", rank=RANK, alpha=ALPHA, variant="toy")
  lora = jlora.Lora(model, config)
  assert lora.variant is TOY and config == jlora.LoraConfig.from_dict(config.to_dict())
  with pytest.raises(jlora.JloraError, match="init_with_base"):
    lora.init(jax.random.key(1), original, x)
  params, adapters = lora.init_with_base(jax.random.key(1), original, x)
  # Functional: the caller's tree is untouched; the state is one array for every kernel, under STATE_KEY.
  assert jlora.STATE_KEY not in original and set(params) == set(original) | {jlora.STATE_KEY}
  state = params[jlora.STATE_KEY]["toy"]
  assert state["p"].shape == (4, RANK) and all(params[k] is original[k] for k in original)
  chex.assert_trees_all_equal(lora.apply(params, adapters, x), model.apply({"params": original}, x))

  adapters = _randomized(adapters)
  got = jax.jit(lambda p, a: lora.apply(p, a, x))(params, adapters)  # the state is closed over inside nn.scan
  want = _np_toy(original, adapters, state, SCALE, x)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - np.asarray(model.apply({"params": original}, x))).max() > 1e-2
  fn = lora.apply_fn()
  chex.assert_trees_all_close(fn({"params": lora.inject(params, adapters)}, x), got, rtol=1e-6, atol=1e-6)

  merged = lora.merge(params, adapters)
  assert set(merged) == set(original)  # the state is not part of the plain params
  chex.assert_trees_all_close(model.apply({"params": merged}, x), got, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lora.unmerge({**merged, jlora.STATE_KEY: params[jlora.STATE_KEY]}, adapters), original,
                              rtol=1e-6, atol=1e-6)
  with pytest.raises(jlora.JloraError, match=r"need their shared frozen state, params\['jlora:state'\]\['toy'\]"):
    lora.apply(original, adapters, x)


def test_everything_that_routes_by_leaf_names_learns_a_registered_variant(tmp_path):
  model, x = StridedConv(), np.random.default_rng(2).normal(size=(2, 7, 8, 3)).astype(np.float32)
  original = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets=r"conv/kernel", rank=RANK, alpha=ALPHA, variant="toy")
  lora = jlora.Lora(model, config)
  params, adapters = lora.init_with_base(jax.random.key(1), original, x)
  adapters = _randomized(adapters)
  tree = {"params": original, "lora": adapters}
  assert jax.tree.leaves(jlora.adapter_labels(tree)["lora"]) == ["adapter", "adapter"]
  tx = jlora.lora_plus(optax.sgd, 0.1, ratio=4.0)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree))
  node = updates["lora"]["conv"]["kernel"]  # toy_d is a per-feature vector: LoRA+ gives it lr * ratio, as PEFT
  np.testing.assert_allclose(node["toy_d"], -0.4)
  assert sharding.adapter_specs(adapters, {"conv": {"kernel": P(None, None, "x", "y"), "bias": P("y")}},
                                lora.targets) == {"conv": {"kernel": {"toy_d": P(None), "toy_b": P(None, "y")}}}
  report = jlora.norm_report(lora, params, adapters)
  assert report.rows[0].update_norm > 0
  # The base an adapter belongs to is the frozen side it was initialised with, its shared state included.
  assert jlora.fingerprint(params) != jlora.fingerprint(original)
  jlora.save_adapters(tmp_path / "a", adapters, config, base_fingerprint=jlora.fingerprint(params))
  target = jax.eval_shape(lambda p: lora.init_with_base(jax.random.key(1), p, x)[1], original)
  restored, loaded = jlora.load_adapters(tmp_path / "a", target, params=params, lora=lora)
  assert loaded == config
  jax.tree.map(np.testing.assert_array_equal, restored, adapters)


def test_registration_is_checked():
  with pytest.raises(jlora.JloraError, match="registered already"):
    variants.register("toy", lambda config: TOY, (TOY,))
  with pytest.raises(jlora.JloraError, match="another variant is named 'lora'"):
    variants.register("other", lambda config: TOY, (TOY._replace(name="lora"),))
  with pytest.raises(jlora.JloraError, match="use_dora=True belongs to the LoRA family"):
    jlora.LoraConfig(targets="kernel", variant="toy", use_dora=True)
  with pytest.raises(jlora.JloraError, match="'no_such_family' is not an available adapter variant"):
    jlora.LoraConfig(targets="kernel", variant="no_such_family")
  with pytest.raises(jlora.JloraError, match="the LoraConfig describes 'toy'"):
    jlora.Lora(ScannedStack(), jlora.LoraConfig(targets="kernel", variant="toy"), variant=jlora.LORA)


class NnxStack(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(4, 6, rngs=rngs)
    self.second = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.second(jnp.tanh(self.first(x)))


def test_nnx_modules_share_one_state_variable():
  model = NnxStack(nnx.Rngs(0))
  x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
  base = model(x)
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=RANK, alpha=ALPHA, variant="toy"),
                       rngs=nnx.Rngs(params=1))
  assert model.first.lora_state is model.second.lora_state
  (state,) = jax.tree.leaves(nnx.state(model, jlora.nnx.LoraState))
  assert state.shape == (6, RANK)  # the largest fan_in
  assert len(jax.tree.leaves(nnx.state(model, jlora.nnx.LoraParam))) == 4  # the state is not trainable
  chex.assert_trees_all_equal(model(x), base)
  rng = np.random.default_rng(4)
  nnx.update(model, jax.tree.map(lambda v: v + 0.5 * rng.normal(size=v.shape).astype(np.float32),
                                 nnx.state(model, jlora.nnx.LoraParam)))
  w = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ad = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam)))
  proj = np.asarray(state, np.float64)

  def dense(name, h):
    a = proj[:h.shape[-1]] * ad[name]["toy_d"]
    return h @ w[name]["kernel"] + w[name]["bias"] + SCALE * (h @ a) @ ad[name]["toy_b"]

  want = dense("second", np.tanh(dense("first", x)))
  np.testing.assert_allclose(np.asarray(model(x), np.float64), want, rtol=1e-5, atol=1e-5)
  plain = jlora.nnx.merged_copy(model)
  np.testing.assert_allclose(np.asarray(plain(x), np.float64), want, rtol=1e-5, atol=1e-5)
  assert not nnx.state(plain, jlora.nnx.LoraState)
