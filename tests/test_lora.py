"""The conformance suite every module kind and every variant must pass.

Each property runs for each module kind (``_cases.CASES``) and each variant (``_cases.VARIANTS``): LoRA, DoRA, and
LoRA started from the kernel (PiSSA, OLoRA). PiSSA/OLoRA adapters compute exactly LoRA's formula on the residual
base, so beyond what is theirs (the factors, the residual, identity at init, merging on the residual) they share
LoRA's runs of the remaining properties rather than repeat the same programs.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _cases import (
    CASES,
    LIFTED,
    LIFTED_CASES,
    VARIANTS,
    OneDense,
    ScannedStack,
    TiedEmbed,
    _lifted,
    assert_tolerance_rejects,
    supports,
    variant_reference,
)

import jlora
from jlora._variant import STATE_KEY, split_state

ALPHA, RANK = 6.0, 2
SCALE = ALPHA / RANK
# Float32 adapter math over a bf16 base is float32 arithmetic on bf16-rounded weights and float32 factors: it
# matches the float64 re-derivation from those same values to ~2e-6. Rounding A and B to bf16, or a scale 1% off,
# moves the output by >= 1e-2; the test checks, case by case, that both fall outside this tolerance.
BF16_BASE_TOL = dict(rtol=2e-5, atol=2e-5)
# A variant other than LoRA is the identity at init up to float32 rounding, not bit for bit: DoRA's scale
# m / ||W + s A@B|| is 1 up to the rounding of a norm computed twice; PiSSA/OLoRA's residual W - s A0@B0 plus
# s A0@B0 is W up to the rounding of that subtraction, whose terms reach s |W| (OLoRA's factors are not divided by
# s), summed over fan_in products: ~1e-6 of outputs of order 1.
IDENTITY_TOL = dict(rtol=1e-5, atol=1e-5)
BASE_REWRITING = ("pissa", "olora")


@dataclasses.dataclass(frozen=True)
class Setup:
  """A case under a variant: the original params, the params the adapters pair with, and the numpy reference."""

  case: object
  variant: str
  original: dict  # the model's own params
  params: dict  # the frozen base of the adapters (PiSSA/OLoRA: the residual)
  lora: jlora.Lora
  adapters: dict
  reference: object  # (params, adapters, scale, *inputs) -> numpy output

  @property
  def scale(self) -> float:
    """The adapters' scale (one for every target of a case): alpha / r for LoRA, alpha / (r + 1e-5) for AdaLoRA
    (PEFT's), 1 for VeRA (no alpha)."""
    (scale,) = {t.scale for t in self.lora.targets.values()}
    return scale


def _setup(case, variant="lora", **config_kwargs):
  original = case.model.init(jax.random.key(0), *case.inputs)["params"]
  config = jlora.LoraConfig(targets=case.targets, rank=RANK, alpha=ALPHA, **VARIANTS[variant], **config_kwargs)
  lora = jlora.Lora(case.model, config)
  params, adapters = lora.init_with_base(jax.random.key(1), original, *case.inputs)
  reference = variant_reference(case.reference, variant, {p: t.layout for p, t in lora.targets.items()})
  return Setup(case, variant, original, params, lora, adapters, reference)


def _nonzero_b(adapters, seed=2):
  """B = 0 hides bugs: give every factor random values (DoRA's magnitude: its init, perturbed, kept positive)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(flat))

  def randomize(path, v, k):
    noise = jax.random.normal(k, v.shape, v.dtype)
    return v * jnp.exp(0.3 * noise) if path[-1].key == "lora_magnitude" else 0.5 * noise

  return jax.tree.unflatten(treedef, [randomize(path, v, k) for (path, v), k in zip(flat, keys)])


_SETUPS = {}


def _cached_setup(case, variant):
  """One setup per case and variant for the session (tests never modify it)."""
  if (case.name, variant) not in _SETUPS:
    _SETUPS[case.name, variant] = _setup(case, variant)
  return _SETUPS[case.name, variant]


def _ids(p):
  return f"{p[0].name}-{p[1]}"


@pytest.fixture(params=[(c, v) for v in VARIANTS for c in CASES if supports(c, v)], ids=_ids)
def setup(request):
  """Every case under every variant."""
  return _cached_setup(*request.param)


# PiSSA/OLoRA share LoRA's runs of the properties that do not depend on where the factors start.
@pytest.fixture(params=[(c, v) for v in VARIANTS if v not in BASE_REWRITING for c in CASES if supports(c, v)],
                ids=_ids)
def computing(request):
  """Every case under every variant that computes its own formula (LoRA, DoRA, VeRA, AdaLoRA)."""
  return _cached_setup(*request.param)


def _matricized(w, layout):
  """``w`` (stack + native) as ``stack + batch + (fan_in, fan_out)`` in numpy."""
  n_stack = w.ndim - len(layout.shape)
  order = list(range(n_stack)) + [n_stack + i for i in layout.batch_axes + layout.in_axes + layout.out_axes]
  lead = w.shape[:n_stack] + tuple(layout.shape[i] for i in layout.batch_axes)
  return np.transpose(w, order).reshape(lead + (layout.fan_in, -1))


def test_adapter_layout(setup):
  params, lora, adapters = setup.params, setup.lora, setup.adapters
  for path, target in lora.targets.items():
    node = adapters
    kernel, original = params, setup.original
    for key in path.split("/"):
      node, kernel, original = node[key], kernel[key], original[key]
    layout = target.layout
    if setup.variant in ("vera", "adalora"):
      _check_factored_layout(setup, node, target)
      assert kernel is original
      continue
    assert set(node) == {"lora_a", "lora_b"} | ({"lora_magnitude"} if setup.variant == "dora" else set())
    assert node["lora_a"].shape == target.stack_shape + layout.a_shape(RANK)
    assert node["lora_b"].shape == target.stack_shape + layout.b_shape(RANK)
    assert node["lora_a"].dtype == jnp.float32
    w = np.asarray(original, np.float64)
    if setup.variant in BASE_REWRITING:
      # s A@B is the kernel's top-r SVD truncation (PiSSA; A and B share sqrt(S_r / s)) / s times the product of
      # the first r columns of Q and rows of R of its QR (OLoRA: A = R_r^T, B = Q_r^T, no division by s), per layer
      # and kernel-batch slice, and the frozen base is the rest; both are sign-invariant, so numpy's factorisation
      # can decide.
      m = _matricized(w, layout)
      if setup.variant == "pissa":
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        want = np.einsum("...ir,...r,...ro->...io", u[..., :RANK], sv[..., :RANK], vh[..., :RANK, :])
      else:
        q, r = np.linalg.qr(np.swapaxes(m, -1, -2))
        want = SCALE * np.swapaxes(q[..., :RANK] @ r[..., :RANK, :], -1, -2)
      a = np.asarray(node["lora_a"], np.float64).reshape(m.shape[:-2] + (layout.fan_in, RANK))
      b = np.asarray(node["lora_b"], np.float64).reshape(m.shape[:-2] + (RANK, m.shape[-1]))
      np.testing.assert_allclose(SCALE * a @ b, want, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(_matricized(np.asarray(kernel, np.float64), layout), m - want, rtol=1e-5, atol=1e-5)
    else:
      assert not np.any(np.asarray(node["lora_b"])) and kernel is original
    if setup.variant == "dora":
      # m starts at each output feature's column norm over the kernel's input axes.
      norms = np.sqrt((_matricized(w, layout) ** 2).sum(-2))
      np.testing.assert_allclose(np.asarray(node["lora_magnitude"]).reshape(norms.shape), norms, rtol=1e-6)


def _check_factored_layout(setup, node, target):
  """VeRA: lambda_b (batch + out) at 0, lambda_d (batch + r) at d_initial, and the shared projections sized to the
  largest fan-in/fan-out, drawn as PEFT draws them; AdaLoRA: A and B at N(0, 0.02), E (batch + r) at 0."""
  layout, stack = target.layout, target.stack_shape
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  out = tuple(layout.shape[i] for i in layout.out_axes)
  if setup.variant == "vera":
    assert {k: v.shape for k, v in node.items()} == {"vera_lambda_b": stack + batch + out,
                                                      "vera_lambda_d": stack + batch + (RANK,)}
    assert not np.any(np.asarray(node["vera_lambda_b"])) and np.all(np.asarray(node["vera_lambda_d"]) == np.float32(0.1))
    projections = setup.params[STATE_KEY]["vera"]
    max_in = max(t.layout.fan_in for t in setup.lora.targets.values())
    max_out = max(int(np.prod([t.layout.shape[i] for i in t.layout.out_axes])) for t in setup.lora.targets.values())
    assert projections["vera_a"].shape == (max_in, RANK) and projections["vera_b"].shape == (RANK, max_out)
    for name, fan in (("vera_a", max_in), ("vera_b", RANK)):  # kaiming-uniform with gain sqrt(2): U(±sqrt(6 / fan))
      assert 0 < np.abs(np.asarray(projections[name])).max() <= np.sqrt(6 / fan)
  else:
    assert {k: v.shape for k, v in node.items()} == {"lora_a": stack + layout.a_shape(RANK),
                                                      "lora_e": stack + batch + (RANK,),
                                                      "lora_b": stack + layout.b_shape(RANK)}
    assert not np.any(np.asarray(node["lora_e"]))
    for name in ("lora_a", "lora_b"):
      assert 0.0 < np.asarray(node[name]).std() < 0.05
  assert all(v.dtype == jnp.float32 for v in node.values())


def test_identity_at_init(setup):
  case = setup.case
  base = case.model.apply({"params": setup.original}, *case.inputs)
  got = setup.lora.apply(setup.params, setup.adapters, *case.inputs)
  if setup.variant == "lora":
    chex.assert_trees_all_equal(got, base)
  else:
    chex.assert_trees_all_close(got, base, **IDENTITY_TOL)


def test_matches_numpy_formula(computing):
  setup = computing
  case, params, lora = setup.case, setup.params, setup.lora
  adapters = _nonzero_b(setup.adapters)
  got = lora.apply(params, adapters, *case.inputs)
  want = setup.reference(params, adapters, setup.scale, *case.inputs)
  base = case.model.apply({"params": params}, *case.inputs)
  assert np.abs(np.asarray(base) - want).max() > 1e-2, "the adapter must change the output"
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def _products(jaxpr):
  """(primitive, output shape) of every dot_general and convolution in a jaxpr and its sub-jaxprs (scan, remat)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _products(sub)


def _kernel_shaped_products(fn, lora, *args):
  """The products in ``fn``'s jaxpr whose output has a frozen kernel's shape (whole or one layer of a stack, with
  its axes in any order: an einsum's dot_general orders them its own way)."""
  kernels, factors = set(), set()
  for t in lora.targets.values():
    kernels |= {tuple(sorted(t.stack_shape + t.layout.shape)), tuple(sorted(t.layout.shape))}
    for shape in (t.layout.a_shape(t.rank), t.layout.b_shape(t.rank)):
      factors |= {tuple(sorted(t.stack_shape + shape)), tuple(sorted(shape))}
  # A factor may share a kernel's shape (scan_remat's head: kernel (4, 2), A (4, r=2)); its gradient is legitimate.
  return [p for p in _products(jax.make_jaxpr(fn)(*args).jaxpr) if tuple(sorted(p[1])) in kernels - factors]


def test_gradients_only_for_adapters(computing):
  setup = computing
  case, params, lora = setup.case, setup.params, setup.lora
  adapters = _nonzero_b(setup.adapters)

  def loss(adapters, params):
    return jnp.sum(jnp.square(lora.apply(params, adapters, *case.inputs)))

  grads = jax.grad(loss)(adapters, params)
  chex.assert_trees_all_equal_structs(grads, adapters)
  for g in jax.tree.leaves(grads):
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)) and np.abs(g).max() > 0
  # The frozen kernels are inputs only: no product in the gradient program has a kernel's shape, neither a
  # delta A @ B (DoRA: nor W + s A @ B) nor a kernel cotangent x^T @ dy (tests/test_flops.py measures the FLOPs this
  # saves).
  assert _kernel_shaped_products(jax.grad(loss), lora, adapters, params) == []

  # The check can fail: LoRA as a merged weight (W + s * A @ B, then the plain model) builds both.
  def merged_weight_loss(adapters, params):
    return jnp.sum(jnp.square(case.model.apply({"params": lora.merge(params, adapters)}, *case.inputs)))

  assert _kernel_shaped_products(jax.grad(merged_weight_loss), lora, adapters, params)


def test_jit_equals_eager(computing):
  setup = computing
  case, params, lora = setup.case, setup.params, setup.lora
  adapters = _nonzero_b(setup.adapters)
  eager = lora.apply(params, adapters, *case.inputs)
  jitted = jax.jit(lambda p, a, *x: lora.apply(p, a, *x))(params, adapters, *case.inputs)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_merge_and_unmerge(setup):
  case, params, lora = setup.case, setup.params, setup.lora
  adapters = _nonzero_b(setup.adapters)
  merged = lora.merge(params, adapters)
  adapted = lora.apply(params, adapters, *case.inputs)
  # A variant's shared frozen state (VeRA's projections) is not part of the merged params; unmerging needs it back.
  params, state = split_state(params)
  chex.assert_trees_all_equal_structs(merged, params)
  chex.assert_trees_all_close(case.model.apply({"params": merged}, *case.inputs), adapted, rtol=1e-5, atol=1e-5)
  if setup.variant == "dora":
    # W' = g ⊙ (W + s A@B) fits any column norm: the merged kernel alone does not give W back (jlora.nnx keeps
    # the norms and unmerges exactly).
    with pytest.raises(jlora.JloraError, match="Cannot unmerge the DoRA adapter"):
      lora.unmerge(merged, adapters)
  else:
    unmerged = lora.unmerge(merged if state is None else {**merged, STATE_KEY: state}, adapters)
    chex.assert_trees_all_close(unmerged, params, rtol=1e-6, atol=1e-6)
  # Only the targeted kernels change; everything else is the very same array.
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    joined = "/".join(k.key for k in path)
    merged_leaf = merged
    for k in path:
      merged_leaf = merged_leaf[k.key]
    assert (joined in lora.targets) != (merged_leaf is leaf)


def test_bf16_base_with_fp32_adapters(computing):
  setup = computing
  case = setup.case
  if case.name == "embed_tied":
    # nn.Embed computes in its table's dtype unless given one; this test is about float32 compute over a bf16
    # base (bf16 compute is test_bf16_compute_dtype's).
    case = dataclasses.replace(case, model=TiedEmbed(dtype=jnp.float32))
  params, lora = setup.params, jlora.Lora(case.model, setup.lora.config)
  lora.trace(params, *case.inputs)
  adapters = _nonzero_b(setup.adapters)
  reference = setup.reference
  params_bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  got = lora.apply(params_bf16, adapters, *case.inputs)
  assert got.dtype == jnp.float32
  want = reference(params_bf16, adapters, setup.scale, *case.inputs)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, **BF16_BASE_TOL)
  factors = ("lora_a", "lora_b", "vera_lambda_b", "vera_lambda_d")  # VeRA's vectors: what it trains instead of A, B
  factors_bf16 = jax.tree_util.tree_map_with_path(
      lambda path, v: v.astype(jnp.bfloat16) if path[-1].key in factors else v, adapters)
  assert_tolerance_rejects(want, {
      "A and B rounded to bf16": reference(params_bf16, factors_bf16, setup.scale, *case.inputs),
      "a scale 1% off": reference(params_bf16, adapters, 1.01 * setup.scale, *case.inputs),
  }, **BF16_BASE_TOL)

  grads = jax.grad(lambda a: jnp.sum(lora.apply(params_bf16, a, *case.inputs).astype(jnp.float32)))(adapters)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  merged = lora.merge(params_bf16, adapters)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(merged))
  # Computed in float32 and cast once: bit for bit the float32 merge of the same values, rounded to bf16.
  merged_f32 = lora.merge(jax.tree.map(lambda v: v.astype(jnp.float32), params_bf16), adapters)
  chex.assert_trees_all_equal(merged, jax.tree.map(lambda v: v.astype(jnp.bfloat16), merged_f32))
  served = case.model.apply({"params": merged}, *case.inputs)
  np.testing.assert_allclose(np.asarray(served, np.float64), case.reference(merged, _no_adapters(lora), 0.0, *case.inputs),
                             **BF16_BASE_TOL)
  # The served model differs from the adapted one only by the bf16 rounding of the merged kernel.
  chex.assert_trees_all_close(served.astype(jnp.float32), got.astype(jnp.float32), rtol=5e-2, atol=5e-2)


def _no_adapters(lora):
  """Zero LoRA factors for every target: the case's formula with the adapter switched off (the plain model)."""
  nodes = {tuple(path.split("/")): {"lora_a": np.zeros(t.stack_shape + t.layout.a_shape(1)),
                                    "lora_b": np.zeros(t.stack_shape + t.layout.b_shape(1))}
           for path, t in lora.targets.items()}
  tree = {}
  for keys, node in nodes.items():
    sub = tree
    for k in keys[:-1]:
      sub = sub.setdefault(k, {})
    sub[keys[-1]] = node
  return tree


def test_bf16_compute_dtype():
  """A module computing in bf16 runs the adapter path in bf16 too, while A/B stay fp32."""
  model = nn.Dense(8, dtype=jnp.bfloat16, name="proj")
  x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4, alpha=6.0))  # s = 1.5: a lost scale shows
  adapters = _nonzero_b(lora.init(jax.random.key(1), params, x))
  y = lora.apply(params, adapters, x)
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(adapters))
  p, a = jax.tree.map(lambda v: np.asarray(v, np.float64), (params, adapters["kernel"]))

  def bf16(v):
    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

  def bf16_module(scale):
    """Rounded to bf16 where the module rounds: its inputs and weights, each product, the bias add, the sum."""
    base = bf16(bf16(bf16(x) @ bf16(p["kernel"])) + bf16(p["bias"]))
    return bf16(base + bf16(bf16(bf16(x) @ bf16(a["lora_a"])) @ bf16(scale * a["lora_b"])))

  # One bf16 step (2^-7 relative) of slack for a rounding that lands on the other side of a tie.
  tol = dict(rtol=2**-7, atol=1e-2)
  np.testing.assert_allclose(np.asarray(y, np.float64), bf16_module(1.5), **tol)
  assert_tolerance_rejects(bf16_module(1.5), {"the scale dropped": bf16_module(1.0)}, **tol)


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


LIFTABLE = [c for c in CASES if c.name not in ("scan_remat", "vmap")]  # the cases LIFTED_CASES stack
assert [_lifted(c).name for c in LIFTABLE] == [c.name for c in LIFTED_CASES]
_LAYOUTS = {}


def _layouts(case):
  """``{kernel path: KernelLayout}`` of a case, from an abstract trace (once per case)."""
  if case.name not in _LAYOUTS:
    abstract = jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"]
    lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=RANK))
    _LAYOUTS[case.name] = {p: t.layout for p, t in lora.trace(abstract, *case.inputs).items()}
  return _LAYOUTS[case.name]


# VeRA and AdaLoRA lifted where their factors meet kernel-batch or interleaved axes (and AdaLoRA's convolution): the
# plain kinds add no code path of theirs beyond scan_remat/vmap in CASES.
_LIFTED_FACTORED = ("dense_general_batch_dims", "einsum_interleaved", "einsum_per_head", "conv")


@pytest.fixture(params=[(c, v) for v in ("lora", "dora", "vera", "adalora") for c in LIFTABLE if supports(c, v)
                        and (v in ("lora", "dora") or c.name in _LIFTED_FACTORED)],
                ids=lambda p: f"{p[0].name}_lifted-{p[1]}")
def lifted_setup(request):
  base, variant = request.param
  reference = variant_reference(base.reference, variant, _layouts(base))
  return _lifted(dataclasses.replace(base, reference=reference)), variant


def _numpy_like(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), abstract)


def test_every_kind_inside_scan_remat_and_vmap(lifted_setup):
  """Each module kind as layers of nn.scan(nn.remat(...)) and members of nn.vmap, against the per-layer numpy."""
  case, variant = lifted_setup
  # Random numpy trees from the shapes alone: only the apply and the merged apply are compiled.
  params = _numpy_like(jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"], 0)
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=RANK, alpha=ALPHA, **VARIANTS[variant]))
  with_state, adapters = jax.eval_shape(lambda p: lora.init_with_base(jax.random.key(1), p, *case.inputs), params)
  adapters = _numpy_like(adapters, 1)
  if STATE_KEY in with_state:  # VeRA's projections, random like the rest
    params = {**params, STATE_KEY: _numpy_like(with_state[STATE_KEY], 2)}
  assert sorted(lora.targets) == sorted(f"{stack}/inner/{case.targets[3:]}" for stack in ("layers", "members"))
  assert all(t.stack_shape == (LIFTED,) for t in lora.targets.values())
  (scale,) = {t.scale for t in lora.targets.values()}
  want = case.reference(params, adapters, scale, *case.inputs)
  got = jax.jit(lambda p, a: lora.apply(p, a, *case.inputs))(params, adapters)
  chex.assert_trees_all_close(jax.tree.map(lambda v: np.asarray(v, np.float64), got), want, rtol=1e-5, atol=1e-5)
  base = jax.jit(case.model.apply)({"params": params}, *case.inputs)
  assert all(np.abs(w - b).max() > 1e-2 for w, b in zip(want, base)), "the adapters must change every output"
  merged = jax.jit(lora.merge)(params, adapters)
  chex.assert_trees_all_close(jax.tree.map(lambda v: np.asarray(v, np.float64), jax.jit(case.model.apply)(
      {"params": merged}, *case.inputs)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", BASE_REWRITING)
@pytest.mark.parametrize("base", [c for c in LIFTABLE if c.name in ("dense_general_batch_dims", "conv")],
                         ids=lambda c: f"{c.name}_lifted")
def test_base_rewriting_init_inside_scan_and_vmap(base, variant):
  """PiSSA/OLoRA factor each layer of a stacked kernel (and each batch slice) on its own: the residual base
  plus the adapter is the original model, layer by layer, inside nn.scan(nn.remat) and nn.vmap."""
  case = _lifted(base)
  params = _numpy_like(jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"], 0)
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=RANK, alpha=ALPHA, **VARIANTS[variant]))
  residual, adapters = jax.jit(lambda p: lora.init_with_base(jax.random.key(1), p, *case.inputs))(params)
  for path, target in lora.targets.items():
    keys = path.split("/")
    w, r, node = params, residual, adapters
    for k in keys:
      w, r, node = w[k], r[k], node[k]
    delta = np.einsum("...ir,...ro->...io", *(np.asarray(node[n], np.float64).reshape(
        (LIFTED, -1) + ((target.layout.fan_in, RANK) if n == "lora_a" else (RANK, w.shape[-1]))) for n in ("lora_a", "lora_b")))
    assert np.abs(delta).max() > 1e-2, "the factors start from the kernel"
    np.testing.assert_allclose(np.asarray(r, np.float64) + SCALE * delta.reshape(w.shape), w, rtol=1e-5, atol=1e-5)
  got = jax.jit(lambda p, a: lora.apply(p, a, *case.inputs))(residual, adapters)
  chex.assert_trees_all_close(got, jax.jit(case.model.apply)({"params": params}, *case.inputs), rtol=1e-5, atol=1e-5)


def test_apply_fn_has_model_apply_signature():
  case = CASES[0]
  s = _setup(case)
  params, lora, adapters = s.params, s.lora, _nonzero_b(s.adapters)
  fn = lora.apply_fn(adapters)
  chex.assert_trees_all_equal(fn({"params": params}, *case.inputs), lora.apply(params, adapters, *case.inputs))


def test_init_from_abstract_params():
  """Targets and adapters can be created without materialising the base (e.g. before sharded loading)."""
  case = CASES[-2]
  s = _setup(case)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), s.params)
  lora2 = jlora.Lora(case.model, s.lora.config)
  adapters2 = lora2.init(jax.random.key(1), abstract, *case.inputs)
  chex.assert_trees_all_equal(adapters2, s.adapters)
  assert lora2.targets == s.lora.targets


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_variants_that_read_the_kernel_need_its_values(variant):
  """DoRA's magnitude and PiSSA's factors come from the kernel's values: abstract params are refused (loudly), while
  jax.eval_shape gives the shapes; and init alone is refused where the base changes too."""
  case = CASES[0]
  s = _setup(case, variant)
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), s.original)
  with pytest.raises(jlora.JloraError, match="params are abstract"):
    s.lora.init_with_base(jax.random.key(1), abstract, *case.inputs)
  shapes = jax.eval_shape(lambda p: s.lora.init_with_base(jax.random.key(1), p, *case.inputs), abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, (s.params, s.adapters))
  if variant == "pissa":
    with pytest.raises(jlora.JloraError, match="changes the frozen base"):
      s.lora.init(jax.random.key(1), s.original, *case.inputs)
