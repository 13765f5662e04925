"""Target discovery and every loud error around it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import CASES, ScannedStack, StridedConv

import jlora


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(8, name="q_proj")(x)
    v = nn.Dense(8, name="v_proj")(x)
    pos = self.param("pos_bias", nn.initializers.zeros, (x.shape[-1],))
    return nn.Dense(4, name="o_proj")(q * v) + jnp.sum(pos)


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Attention(name="attn")(x)
    return nn.Dense(4, name="unused_when_flag")(x) if False else x


def _init(model, x):
  return model.init(jax.random.key(0), x)["params"]


X = np.ones((2, 4), np.float32)


def test_finds_targets_with_layout_and_scale():
  model = Model()
  params = _init(model, X)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|v_proj)/kernel", rank=4, alpha=8.0,
                                            rank_pattern={r".*v_proj.*": 2}))
  adapters = lora.init(jax.random.key(0), params, X)
  assert sorted(lora.targets) == ["attn/q_proj/kernel", "attn/v_proj/kernel"]
  q = lora.targets["attn/q_proj/kernel"]
  assert (q.kind, q.rank, q.scale, q.stack_shape, q.layout.shape) == ("dense", 4, 2.0, (), (4, 8))
  assert lora.targets["attn/v_proj/kernel"].scale == 4.0
  assert adapters["attn"]["v_proj"]["kernel"]["lora_a"].shape == (4, 2)
  assert set(adapters["attn"]) == {"q_proj", "v_proj"}


def test_stacked_layers_get_leading_axis():
  case = next(c for c in CASES if c.name == "scan_remat")
  params = _init(case.model, *case.inputs)
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=r"layers/fc/kernel", rank=3))
  adapters = lora.init(jax.random.key(0), params, *case.inputs)
  assert lora.targets["layers/fc/kernel"].stack_shape == (3,)
  assert adapters["layers"]["fc"]["kernel"]["lora_a"].shape == (3, 4, 3)
  assert adapters["layers"]["fc"]["kernel"]["lora_b"].shape == (3, 3, 4)


def test_kaiming_uniform_bound_and_gaussian():
  model = nn.Dense(64)
  x = np.ones((1, 256), np.float32)
  params = _init(model, x)
  a = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=16)).init(jax.random.key(0), params, x)["kernel"]["lora_a"]
  bound = 1 / np.sqrt(256)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert abs(np.var(np.asarray(a)) - bound**2 / 3) < 0.1 * bound**2 / 3  # variance of U(-b, b)
  g = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=16, init="gaussian")).init(
      jax.random.key(0), params, x)["kernel"]["lora_a"]
  assert abs(np.std(np.asarray(g)) - 1 / 16) < 0.1 / 16


def test_rule_matching_nothing_names_rule_and_near_misses():
  model = Model()
  params = _init(model, X)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=[r".*/q_proj/kernel", r"q_proj"]))
  with pytest.raises(jlora.JloraError, match=r"'q_proj' matches no parameter.*attn/q_proj/kernel"):
    lora.init(jax.random.key(0), params, X)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r"attn/qproj/kernel"))
  with pytest.raises(jlora.JloraError, match=r"Near misses.*attn/q_proj/kernel"):
    lora.init(jax.random.key(0), params, X)


@pytest.mark.parametrize("rule, match", [
    (r"attn/q_proj/bias", r"'attn/q_proj/bias' is the 'bias' parameter of Dense"),
    (r"attn/pos_bias", r"'attn/pos_bias' is the 'pos_bias' parameter of Attention"),
])
def test_unsupported_parameter_raises(rule, match):
  model = Model()
  params = _init(model, X)
  with pytest.raises(jlora.JloraError, match=match):
    jlora.Lora(model, jlora.LoraConfig(targets=rule)).init(jax.random.key(0), params, X)


def test_subclass_with_own_call_is_refused():
  class ScaledDense(nn.Dense):
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  model = ScaledDense(4)
  params = _init(model, X)
  with pytest.raises(jlora.JloraError, match="ScaledDense"):
    jlora.Lora(model, jlora.LoraConfig(targets="kernel")).init(jax.random.key(0), params, X)


def test_grouped_and_masked_conv_are_refused():
  x = np.ones((1, 5, 5, 4), np.float32)
  grouped = nn.Conv(4, (3, 3), feature_group_count=2)
  with pytest.raises(jlora.JloraError, match="feature_group_count=2"):
    jlora.Lora(grouped, jlora.LoraConfig(targets="kernel")).init(jax.random.key(0), _init(grouped, x), x)
  masked = nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 4, 4)))
  with pytest.raises(jlora.JloraError, match="mask"):
    jlora.Lora(masked, jlora.LoraConfig(targets="kernel")).init(jax.random.key(0), _init(masked, x), x)


def test_uncalled_module_is_refused():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x, use_b=False):
      a, b = nn.Dense(4, name="a"), nn.Dense(4, name="b")
      return b(x) if use_b else a(x)

  model = Branchy()
  params = model.init(jax.random.key(0), X, use_b=True)["params"]
  params = {**params, **_init(model, X)}
  with pytest.raises(jlora.JloraError, match="never called"):
    jlora.Lora(model, jlora.LoraConfig(targets=r"b/kernel")).init(jax.random.key(0), params, X)


def test_non_leading_scan_axis_is_refused():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(4, name="fc")(x), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)(name="s")(x, None)[0]

  model = Stack()
  params = _init(model, X)
  with pytest.raises(jlora.JloraError, match="leading axes"):
    jlora.Lora(model, jlora.LoraConfig(targets=r"s/fc/kernel")).init(jax.random.key(0), params, X)


def test_linen_only():
  with pytest.raises(jlora.JloraError, match="jlora.nnx"):
    jlora.Lora(object(), jlora.LoraConfig(targets="k"))  # type: ignore[arg-type]


class TestAdapterTreeChecks:
  """A wrong adapter tree (another model, another rank, stray keys) fails loudly, never silently."""

  def _setup(self):
    model = ScannedStack()
    x = np.ones((2, 4), np.float32)
    params = _init(model, x)
    lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2))
    return model, x, params, lora, lora.init(jax.random.key(0), params, x)

  def test_unknown_path(self):
    _, x, params, lora, adapters = self._setup()
    bad = {**adapters, "nope": adapters["head"]}
    with pytest.raises(jlora.JloraError, match="'nope/kernel' has no matching parameter"):
      lora.apply(params, bad, x)

  def test_wrong_rank(self):
    model, x, params, lora, adapters = self._setup()
    other = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=4))
    with pytest.raises(jlora.JloraError, match=r"fc/kernel/lora_a.*\(4, 2\).*\(4, 4\)"):
      other.apply(params, adapters, x)
    other.trace(params, x)
    with pytest.raises(jlora.JloraError, match="rank 4"):
      other.merge(params, adapters)

  def test_missing_stack_axis(self):
    _, x, params, lora, adapters = self._setup()
    bad = jax.tree.map(lambda v: v, adapters)
    bad["layers"]["fc"]["kernel"] = {k: v[0] for k, v in bad["layers"]["fc"]["kernel"].items()}
    with pytest.raises(jlora.JloraError, match="layers/fc/kernel"):
      lora.apply(params, bad, x)
    with pytest.raises(jlora.JloraError, match="layers/fc/kernel"):
      lora.merge(params, bad)

  def test_stray_and_missing_keys(self):
    _, x, params, lora, adapters = self._setup()
    extra = {**adapters, "head": {"kernel": {**adapters["head"]["kernel"], "magnitude": jnp.ones(2)}}}
    with pytest.raises(jlora.JloraError, match="has keys"):
      lora.apply(params, extra, x)
    missing = {**adapters, "head": {"kernel": {"lora_a": adapters["head"]["kernel"]["lora_a"]}}}
    with pytest.raises(jlora.JloraError, match="has keys"):
      lora.apply(params, missing, x)
    stray = {**adapters, "note": jnp.ones(1)}
    with pytest.raises(jlora.JloraError, match="outside any adapter"):
      lora.apply(params, stray, x)

  def test_merge_needs_a_trace(self):
    model, x, params, lora, adapters = self._setup()
    rng = np.random.default_rng(0)  # non-zero B: merging nothing, or the wrong thing, must not pass
    adapters = jax.tree.map(lambda v: (0.5 * rng.normal(size=v.shape)).astype(v.dtype), adapters)
    fresh = jlora.Lora(model, lora.config)
    with pytest.raises(jlora.JloraError, match="lora.trace"):
      fresh.merge(params, adapters)
    fresh.trace(params, x)
    merged = fresh.merge(params, adapters)
    scale = lora.config.alpha / lora.config.rank  # 8: a dropped scale shows
    for owner in (("layers", "fc"), ("head",)):
      p, m, a = params, merged, adapters
      for key in owner:
        p, m, a = p[key], m[key], a[key]
      a, b = np.asarray(a["kernel"]["lora_a"], np.float64), np.asarray(a["kernel"]["lora_b"], np.float64)
      want = np.asarray(p["kernel"], np.float64) + scale * np.einsum("...ir,...ro->...io", a, b)
      np.testing.assert_allclose(m["kernel"], want, rtol=1e-6, atol=1e-6)
      assert m["bias"] is p["bias"]
    np.testing.assert_allclose(model.apply({"params": merged}, x), lora.apply(params, adapters, x), atol=1e-6)


def test_conv_case_has_spatial_in_axes():
  params = _init(StridedConv(), np.ones((1, 8, 8, 3), np.float32))
  lora = jlora.Lora(StridedConv(), jlora.LoraConfig(targets="conv/kernel", rank=2))
  lora.trace(params, np.ones((1, 8, 8, 3), np.float32))
  layout = lora.targets["conv/kernel"].layout
  assert (layout.in_axes, layout.out_axes, layout.fan_in) == ((0, 1, 2), (3,), 27)
