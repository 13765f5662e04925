"""jlora.nnx: the conformance suite for flax.nnx model surgery, against numpy re-derivations, for every variant.

Every reference below re-derives ``base(x) + s * (x @ A) @ B`` by hand in float64 numpy from the
model's own variables (plain einsums, explicit convolution loops), with the scale ``s`` written out
per path; none of it calls jlora. DoRA's reference is the same base formula on DoRA's merged kernels
(``_cases.np_dora_kernel``). PiSSA/OLoRA compute LoRA's formula on the residual base, so they run the
properties of their own (the state surgery leaves, identity at init, merging) and share LoRA's runs of the rest.
"""

import dataclasses
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CASES as LINEN_CASES
from _cases import (
  VARIANTS,
  _np_conv_same_stride2,
  assert_tolerance_rejects,
  np_delta,
  np_dora_kernel,
  np_effective_factors,
)
from flax import nnx

import jlora
import jlora.nnx
from jlora import KernelLayout
from jlora.nnx import LoraParam

RANK, ALPHA = 2, 6.0
SCALE = ALPHA / RANK
# Float32 adapter math over a bf16 base matches the float64 re-derivation from the same bf16 weights and float32
# factors to ~2e-6; rounding A and B to bf16 or a scale 1% off moves the output by >= 1e-2 (checked in the test).
BF16_BASE_TOL = dict(rtol=2e-5, atol=2e-5)
# Other variants are the identity at init up to float32 rounding (see tests/test_lora.py's IDENTITY_TOL).
IDENTITY_TOL = dict(rtol=1e-5, atol=1e-5)
BASE_REWRITING = ("pissa", "olora")
# Variants whose adapter is LoRA's formula on factors of their own (_cases.np_effective_factors), and the cases they
# refuse: VeRA adapts linear layers only and has one rank and no alpha; AdaLoRA adapts no embeddings and has no
# alpha_pattern (the block stack sets rank and alpha patterns).
FACTORED = ("vera", "adalora")
REFUSED = {"vera": ("conv_strided", "embed_tied", "block_stack"), "adalora": ("embed_tied", "block_stack")}


def _rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _weights(model) -> dict:
  """Every Param and LoraParam of the model as a float64 numpy array, nested by path."""
  state = nnx.state(model, nnx.Any(nnx.Param, LoraParam))
  return jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(state))


# --- one small model per supported module kind -------------------------------------------------------


class OneLinear(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 5, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _ref_linear(w, s, x):
  p = w["proj"]
  return x @ p["kernel"] + p["bias"] + s["proj/kernel"] * (x @ p["lora_a"]) @ p["lora_b"]


class MultiAxisLinearGeneral(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral((4, 5), (3, 2), axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _ref_linear_general(w, s, x):
  p = w["proj"]
  base = np.einsum("bij,ijkl->bkl", x, p["kernel"]) + p["bias"]
  return base + s["proj/kernel"] * np.einsum("bij,ijr,rkl->bkl", x, p["lora_a"], p["lora_b"])


class BatchedLinearGeneral(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral(5, 6, axis=-1, batch_axis={0: 3}, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _ref_batched_linear_general(w, s, x):
  p = w["proj"]
  base = np.einsum("bti,bio->bto", x, p["kernel"]) + p["bias"][:, None, :]
  return base + s["proj/kernel"] * np.einsum("bti,bir,bro->bto", x, p["lora_a"], p["lora_b"])


class HeadsEinsum(nnx.Module):
  """Kernel axes interleave output and input roles: (heads: out, d: in, head_dim: out)."""

  def __init__(self, rngs):
    self.proj = nnx.Einsum("btd,ndh->btnh", (2, 4, 3), (2, 3), rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _ref_heads_einsum(w, s, x):
  p = w["proj"]
  base = np.einsum("btd,ndh->btnh", x, p["kernel"]) + p["bias"]
  return base + s["proj/kernel"] * np.einsum("btd,dr,rnh->btnh", x, p["lora_a"], p["lora_b"])


class PerHeadEinsum(nnx.Module):
  """A kernel axis shared by input, kernel and output (per-head projection)."""

  def __init__(self, rngs):
    self.proj = nnx.Einsum("bnd,ndh->bnh", (3, 4, 5), rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _ref_per_head_einsum(w, s, x):
  p = w["proj"]
  return (np.einsum("bnd,ndh->bnh", x, p["kernel"])
          + s["proj/kernel"] * np.einsum("bnd,ndr,nrh->bnh", x, p["lora_a"], p["lora_b"]))


class StridedConv(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), strides=2, padding="SAME", rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


def _ref_conv(w, s, x):
  p = w["conv"]
  return (_np_conv_same_stride2(x, p["kernel"]) + p["bias"]
          + s["conv/kernel"] * _np_conv_same_stride2(x, p["lora_a"]) @ p["lora_b"])


class TiedEmbed(nnx.Module):
  """Embedding lookup followed by the tied output projection (``attend``)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)

  def __call__(self, ids):
    return self.embed.attend(jnp.tanh(self.embed(ids)))


def _ref_tied_embed(w, s, ids):
  p = w["embed"]
  table = p["embedding"] + s["embed/embedding"] * p["lora_a"] @ p["lora_b"]
  return np.tanh(table[ids]) @ table.T


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jnp.tanh(self.up(self.norm(x))))


class BlockStack(nnx.Module):
  """Embedding, two pre-norm residual MLP blocks, a head: the adapted and the frozen interleave."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(12, 8, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.head = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def _ref_block_stack(w, s, ids):
  def dense(p, path, x):
    y = x @ p["kernel"] + p["bias"]
    return y + s[path] * (x @ p["lora_a"]) @ p["lora_b"] if path in s else y

  def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]

  x = w["embed"]["embedding"][ids]
  for i in range(2):
    b = w["blocks"][i]
    h = np.tanh(dense(b["up"], f"blocks/{i}/up/kernel", layer_norm(b["norm"], x)))
    x = x + dense(b["down"], f"blocks/{i}/down/kernel", h)
  return dense(w["head"], "head/kernel", x)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[[nnx.Rngs], nnx.Module]
  inputs: tuple
  targets: str | tuple[str, ...]
  # kernel path -> (lora_a shape, lora_b shape, scale), written out by hand
  adapters: dict
  # (weights, {kernel path: scale}, *inputs) -> expected output, numpy float64
  reference: Callable
  config: dict = dataclasses.field(default_factory=dict)
  variant: str = "lora"

  @property
  def scales(self):
    """The scale per path: as written for the LoRA family; VeRA has none (1), AdaLoRA's is alpha / (r + 1e-5)."""
    if self.variant in FACTORED:
      return {path: 1.0 if self.variant == "vera" else ALPHA / (RANK + 1e-5) for path in self.adapters}
    return {path: scale for path, (_, _, scale) in self.adapters.items()}


R = RANK
CASES = [
    Case("linear", OneLinear, (_rand((2, 3, 4), 0),), r"proj/kernel",
         {"proj/kernel": ((4, R), (R, 5), SCALE)}, _ref_linear),
    Case("linear_general_multi_axis", MultiAxisLinearGeneral, (_rand((2, 4, 5), 1),), r"proj/kernel",
         {"proj/kernel": ((4, 5, R), (R, 3, 2), SCALE)}, _ref_linear_general),
    Case("linear_general_batch_axis", BatchedLinearGeneral, (_rand((3, 2, 5), 2),), r"proj/kernel",
         {"proj/kernel": ((3, 5, R), (3, R, 6), SCALE)}, _ref_batched_linear_general),
    Case("einsum_interleaved", HeadsEinsum, (_rand((2, 3, 4), 3),), r"proj/kernel",
         {"proj/kernel": ((4, R), (R, 2, 3), SCALE)}, _ref_heads_einsum),
    Case("einsum_per_head", PerHeadEinsum, (_rand((2, 3, 4), 4),), r"proj/kernel",
         {"proj/kernel": ((3, 4, R), (3, R, 5), SCALE)}, _ref_per_head_einsum),
    Case("conv_strided", StridedConv, (_rand((2, 7, 8, 3), 5),), r"conv/kernel",
         {"conv/kernel": ((3, 3, 3, R), (R, 6), SCALE)}, _ref_conv),
    Case("embed_tied", TiedEmbed, (np.array([[1, 2, 3, 9, 0], [4, 4, 5, 6, 7]], np.int32),), r"embed/embedding",
         {"embed/embedding": ((10, R), (R, 6), SCALE)}, _ref_tied_embed),
    # rank_pattern / alpha_pattern: block 1 has rank 3, every "down" has alpha 2.
    Case("block_stack", BlockStack, (np.array([[0, 5, 11, 3], [7, 7, 2, 1]], np.int32),),
         (r"blocks/\d+/(up|down)/kernel", r"head/kernel"),
         {"blocks/0/up/kernel": ((8, 2), (2, 16), 6.0 / 2), "blocks/0/down/kernel": ((16, 2), (2, 8), 2.0 / 2),
          "blocks/1/up/kernel": ((8, 3), (3, 16), 6.0 / 3), "blocks/1/down/kernel": ((16, 3), (3, 8), 2.0 / 3),
          "head/kernel": ((8, 2), (2, 5), 6.0 / 2)},
         _ref_block_stack, dict(rank_pattern={r"blocks/1/.*": 3}, alpha_pattern={r".*/down/kernel": 2.0})),
]


def _ids(case):
  return f"{case.name}-{case.variant}"


@pytest.fixture(params=[dataclasses.replace(c, variant=v) for v in VARIANTS for c in CASES
                        if c.name not in REFUSED.get(v, ())], ids=_ids)
def case(request):
  """Every case under every variant."""
  return request.param


# PiSSA/OLoRA share LoRA's runs of the properties that do not depend on where the factors start.
@pytest.fixture(params=[dataclasses.replace(c, variant=v) for v in VARIANTS if v not in BASE_REWRITING for c in CASES
                        if c.name not in REFUSED.get(v, ())], ids=_ids)
def computing(request):
  """Every case under every variant that computes its own formula (LoRA, DoRA)."""
  return request.param


_BASES = {}
_LAYOUTS = {}


def _layouts(case) -> dict:
  """``{kernel path: KernelLayout}`` of the case's adapted kernels (from one surgery on a clone, once per case)."""
  if case.name not in _LAYOUTS:
    model = nnx.clone(_base(case)[0])
    config = jlora.LoraConfig(targets=case.targets, **{"rank": RANK, "alpha": ALPHA, **case.config})
    jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(params=1))
    _LAYOUTS[case.name] = {m.lora_target.path: m.lora_target.layout for _, m in nnx.iter_modules(model)
                           if hasattr(m, "lora_target")}
  return _LAYOUTS[case.name]


def _reference(case, model=None) -> Callable:
  """The case's numpy reference for its variant: DoRA's is the base formula on its merged kernels; VeRA's and
  AdaLoRA's LoRA's formula on their effective factors (VeRA's projections read from ``model``)."""
  if case.variant in FACTORED:
    return _factored_reference(case, model)
  if case.variant != "dora":
    return case.reference
  layouts = _layouts(case)

  def dora(weights, scales, *inputs):
    weights = _copy(weights)
    for path, layout in layouts.items():
      *owner_keys, name = path.split("/")
      owner = weights
      for key in owner_keys:
        owner = owner[int(key) if key.isdigit() else key]
      owner[name] = np_dora_kernel(owner[name], owner, scales[path], layout)
    return case.reference(weights, {k: 0.0 for k in scales}, *inputs)

  return dora


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _owner(weights, path):
  """The dict of the module that owns the kernel at ``path`` (nnx paths index lists by number)."""
  owner = weights
  for key in path.split("/")[:-1]:
    owner = owner[int(key) if key.isdigit() else key]
  return owner


def _factored_reference(case, model) -> Callable:
  layouts = _layouts(case)
  states = [m.lora_state_value() for _, m in nnx.iter_modules(model) if hasattr(m, "lora_target")]
  state = states[0] if states else None

  def factored(weights, scales, *inputs):
    weights = _copy(weights)
    for path, layout in layouts.items():
      owner = _owner(weights, path)
      owner["lora_a"], owner["lora_b"] = np_effective_factors(owner, case.variant, layout, state)
    return case.reference(weights, scales, *inputs)

  return factored


def _zero_factors(weights, case) -> dict:
  """``weights`` with zero LoRA factors on every adapted module: the case's formula with the adapter off."""
  weights = _copy(weights)
  for path, (a_shape, b_shape, _) in case.adapters.items():
    owner = _owner(weights, path)
    owner["lora_a"], owner["lora_b"] = np.zeros(a_shape), np.zeros(b_shape)
  return weights


def _base(case, dtype=None):
  """The case's unadapted model and its output, built once per session (tests take nnx.clone copies)."""
  if (case.name, dtype) not in _BASES:
    model = case.make(nnx.Rngs(0))
    if dtype is not None:
      nnx.update(model, jax.tree.map(lambda v: v.astype(dtype), nnx.state(model, nnx.Param)))
    _BASES[case.name, dtype] = model, model(*case.inputs)
  return _BASES[case.name, dtype]


def _setup(case, *, dtype=None, **config_kwargs):
  """The case's model before and after surgery: (model, base output, base Param state, adapted paths)."""
  base, base_out = _base(case, dtype)
  model = nnx.clone(base)
  base_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  config = jlora.LoraConfig(targets=case.targets, **{"rank": RANK, "alpha": ALPHA, **case.config,
                                                      **VARIANTS[case.variant], **config_kwargs})
  paths = jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(params=1, dropout=2))
  return model, base_out, base_params, paths


def _randomize(model, seed=3):
  """B = 0 hides bugs: give every adapter factor random values (DoRA's magnitude: its init, perturbed, kept
  positive)."""
  rng = np.random.default_rng(seed)

  def randomize(path, v):
    noise = rng.normal(size=v.shape)
    return jnp.asarray(v * np.exp(0.3 * noise) if path[-1] == "lora_magnitude" else 0.5 * noise, v.dtype)

  state = nnx.state(model, LoraParam)
  nnx.update(model, nnx.from_flat_state([(path, v.replace(randomize(path, v.get_value())))
                                         for path, v in nnx.to_flat_state(state)]))


def _flat(state) -> dict:
  return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(state)}


def _adapter_bytes(model) -> int:
  return sum(v.nbytes for v in jax.tree.leaves(nnx.state(model, LoraParam)))


# --- the conformance suite ------------------------------------------------------------------------------


def test_adapter_state(case):
  model, _, base_params, paths = _setup(case)
  assert sorted(paths) == sorted(case.adapters)
  adapters = _flat(nnx.state(model, LoraParam))
  expected = {}
  for path, (a_shape, b_shape, _) in case.adapters.items():
    owner = path.rsplit("/", 1)[0]
    if case.variant in FACTORED:
      expected.update(_factored_shapes(owner, _layouts(case)[path], case.variant))
      continue
    expected[f"{owner}/lora_a"], expected[f"{owner}/lora_b"] = a_shape, b_shape
    if case.variant == "dora":  # a magnitude per output feature: the kernel's batch and output axes
      layout = _layouts(case)[path]
      expected[f"{owner}/lora_magnitude"] = tuple(layout.shape[i] for i in layout.batch_axes + layout.out_axes)
  assert {k: v.shape for k, v in adapters.items()} == expected
  params = _flat(nnx.state(model, nnx.Param))
  base_flat = {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(_base(case)[0], nnx.Param))}
  for key, value in adapters.items():
    assert value.dtype == jnp.float32
    if case.variant in FACTORED:  # VeRA: lambda_b 0, lambda_d d_initial; AdaLoRA: E 0, A and B ~ N(0, 0.02)
      start = {"vera_lambda_b": 0.0, "vera_lambda_d": 0.1, "lora_e": 0.0}.get(key.rsplit("/", 1)[-1])
      assert np.all(np.asarray(value) == np.float32(start)) if start is not None else 0 < np.std(value) < 0.05, key
    elif case.variant in BASE_REWRITING:
      assert np.any(np.asarray(value)), key  # both factors start from the kernel
    elif not key.endswith("lora_magnitude"):
      assert np.any(np.asarray(value)) == key.endswith("lora_a"), key  # A random, B zero
  for path in case.adapters:
    owner = path.rsplit("/", 1)[0]
    if case.variant == "dora":  # m starts at the column norms of W over its input axes
      layout = _layouts(case)[path]
      w = np.asarray(params[path], np.float64)
      norms = np.sqrt(np.sum(w * w, axis=layout.in_axes))
      np.testing.assert_allclose(adapters[f"{owner}/lora_magnitude"], norms, rtol=1e-6)
    if case.variant in BASE_REWRITING:  # the kernel is the residual: W - s A@B
      delta = np_delta(adapters[f"{owner}/lora_a"], adapters[f"{owner}/lora_b"], _layouts(case)[path])
      assert np.abs(delta).max() > 1e-2, "the factors start from the kernel"
      np.testing.assert_allclose(np.asarray(params[path], np.float64) + case.scales[path] * delta,
                                 base_flat[path].get_value(), rtol=1e-5, atol=1e-5)
  if case.variant in BASE_REWRITING:
    # Only the targeted kernels changed.
    for path, value in params.items():
      assert (path in case.adapters) != np.array_equal(value, base_flat[path].get_value()), path
  else:
    # The frozen base is exactly what it was: same paths, same bits, no adapter leaves.
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), base_params)


def _factored_shapes(owner, layout, variant) -> dict:
  """VeRA's vectors (lambda_b: batch + out, lambda_d: batch + r) or AdaLoRA's A, E (batch + r), B, by leaf path."""
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  if variant == "vera":
    return {f"{owner}/vera_lambda_b": batch + tuple(layout.shape[i] for i in layout.out_axes),
            f"{owner}/vera_lambda_d": batch + (RANK,)}
  return {f"{owner}/lora_a": layout.a_shape(RANK), f"{owner}/lora_e": batch + (RANK,),
          f"{owner}/lora_b": layout.b_shape(RANK)}


def test_identity_at_init(case):
  model, base_out, _, _ = _setup(case)
  if case.variant == "lora":
    chex.assert_trees_all_equal(model(*case.inputs), base_out)
  else:
    chex.assert_trees_all_close(model(*case.inputs), base_out, **IDENTITY_TOL)


def test_matches_numpy_formula(computing):
  case = computing
  model, base_out, _, _ = _setup(case)
  _randomize(model)
  got = model(*case.inputs)
  want = _reference(case, model)(_weights(model), case.scales, *case.inputs)
  assert np.abs(np.asarray(base_out) - want).max() > 1e-2, "the adapter must change the output"
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_optimizer_trains_only_adapters(computing):
  case = computing
  model, _, base_params, _ = _setup(case)
  _randomize(model)
  before = _flat(nnx.state(model, LoraParam))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoraParam)

  @nnx.jit
  def train_step(model, optimizer, *inputs):
    def loss(model):
      return jnp.mean(jnp.square(model(*inputs)))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoraParam))(model)
    optimizer.update(model, grads)
    return grads

  for _ in range(2):
    grads = train_step(model, optimizer, *case.inputs)
  grads = _flat(grads)
  assert set(grads) == set(before)
  for g in grads.values():
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)) and np.abs(g).max() > 0
  after = _flat(nnx.state(model, LoraParam))
  for key in before:
    assert not np.array_equal(after[key], before[key]), f"{key} was not trained"
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), base_params)
  # Adam keeps two moments per adapter leaf and nothing per frozen leaf (only scalar step counters).
  opt_leaves = jax.tree.leaves(nnx.state(optimizer))
  assert sum(v.nbytes for v in opt_leaves if v.ndim) == 2 * _adapter_bytes(model)
  assert all(v.size == 1 for v in opt_leaves if not v.ndim)


def test_jit_equals_eager(computing):
  case = computing
  model, _, _, _ = _setup(case)
  _randomize(model)
  eager = model(*case.inputs)
  jitted = nnx.jit(lambda model, *x: model(*x))(model, *case.inputs)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_merge_unmerge_and_merged_copy(case):
  model, _, _, _ = _setup(case)
  _randomize(model)
  adapted_out = model(*case.inputs)
  base_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # PiSSA/OLoRA: the residual base

  base_flat = _flat(nnx.state(model, nnx.Param))
  jlora.nnx.merge(model)
  merged = _flat(nnx.state(model, nnx.Param))
  for path in merged:
    # Exactly the targeted kernels change.
    assert (path in case.adapters) != np.array_equal(merged[path], base_flat[path]), path
  chex.assert_trees_all_close(model(*case.inputs), adapted_out, rtol=1e-5, atol=1e-5)

  jlora.nnx.unmerge(model)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), base_params, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(model(*case.inputs), adapted_out, rtol=1e-5, atol=1e-5)

  plain = jlora.nnx.merged_copy(model)
  # A plain nnx model again: the original classes and variables, nothing of jlora's left.
  assert nnx.graphdef(plain) == nnx.graphdef(_base(case)[0])
  assert not nnx.state(plain, LoraParam)
  chex.assert_trees_all_close(plain(*case.inputs), adapted_out, rtol=1e-5, atol=1e-5)
  # The original is untouched: still adapted, unmerged, same output.
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), base_params, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(model(*case.inputs), adapted_out, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_adapters(computing):
  case = computing
  model, _, _, _ = _setup(case, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, LoraParam)))
  _randomize(model)
  got = model(*case.inputs)
  assert got.dtype == jnp.float32
  weights = _weights(model)
  reference = _reference(case, model)
  want = reference(weights, case.scales, *case.inputs)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, **BF16_BASE_TOL)
  factors_bf16 = {"lora_a", "lora_b", "vera_lambda_b", "vera_lambda_d"}  # VeRA trains vectors instead of A, B
  rounded = jax.tree_util.tree_map_with_path(
      lambda path, v: np.asarray(v.astype(np.float32).astype(jnp.bfloat16), np.float64)
      if path[-1].key in factors_bf16 else v, weights)
  assert_tolerance_rejects(want, {
      "A and B rounded to bf16": reference(rounded, case.scales, *case.inputs),
      "a scale 1% off": reference(weights, {k: 1.01 * s for k, s in case.scales.items()}, *case.inputs),
  }, **BF16_BASE_TOL)

  grads = nnx.eval_shape(nnx.grad(lambda m: jnp.sum(m(*case.inputs).astype(jnp.float32)),
                                  argnums=nnx.DiffState(0, LoraParam)), model)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  plain = jlora.nnx.merged_copy(model)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(plain, nnx.Param)))
  # Computed in float32 and cast once: bit for bit the float32 merge of the same values, rounded to bf16.
  as_f32 = nnx.clone(model)
  nnx.update(as_f32, jax.tree.map(lambda v: v.astype(jnp.float32), nnx.state(as_f32, nnx.Param)))
  merged_f32 = nnx.state(jlora.nnx.merged_copy(as_f32), nnx.Param)
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(plain, nnx.Param)),
                              nnx.to_pure_dict(jax.tree.map(lambda v: v.astype(jnp.bfloat16), merged_f32)))
  served = plain(*case.inputs)

  # The merged kernels with the adapter switched off (zero factors at scale 0).
  want_served = case.reference(_zero_factors(_weights(plain), case), {k: 0.0 for k in case.scales}, *case.inputs)
  np.testing.assert_allclose(np.asarray(served, np.float64), want_served, **BF16_BASE_TOL)
  # The served model differs from the adapted one only by the bf16 rounding of W + s * A @ B.
  chex.assert_trees_all_close(served.astype(jnp.float32), got.astype(jnp.float32), rtol=5e-2, atol=5e-2)


# --- config options ---------------------------------------------------------------------------------


def test_rslora_scale():
  case = CASES[0]
  model, _, _, _ = _setup(case, use_rslora=True, rank=4)
  a = np.asarray(model.proj.lora_a[...])
  assert a.shape == (4, 4)
  _randomize(model)
  want = case.reference(_weights(model), {"proj/kernel": ALPHA / np.sqrt(4)}, *case.inputs)
  np.testing.assert_allclose(np.asarray(model(*case.inputs), np.float64), want, rtol=1e-5, atol=1e-5)


def test_init_distributions():
  """A: uniform within PEFT's kaiming bound 1/sqrt(fan_in), or N(0, (1/r)^2) with init="gaussian"."""
  base = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
  model = nnx.clone(base)
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="kernel", rank=16), rngs=nnx.Rngs(1))
  a = np.asarray(model.lora_a[...])
  assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.9 / 8
  model = nnx.clone(base)
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="kernel", rank=16, init="gaussian"), rngs=nnx.Rngs(1))
  assert abs(np.asarray(model.lora_a[...]).std() - 1 / 16) < 0.005


def test_keys_depend_on_path_only():
  """Adapting more kernels does not change the A of the others."""
  case = CASES[-1]
  one, _, _, _ = _setup(case)
  two = nnx.clone(_base(case)[0])
  jlora.nnx.apply_lora(two, jlora.LoraConfig(targets=r"head/kernel", rank=RANK), rngs=nnx.Rngs(params=1))
  chex.assert_trees_all_equal(two.head.lora_a[...], one.head.lora_a[...])


def test_subclass_without_override_is_adapted_and_keeps_its_class():
  class MyLinear(nnx.Linear):
    def describe(self):
      return "mine"

  model = MyLinear(4, 5, rngs=nnx.Rngs(0))
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="kernel", rank=RANK), rngs=nnx.Rngs(1))
  assert isinstance(model, MyLinear) and model.describe() == "mine"
  assert type(jlora.nnx.merged_copy(model)) is MyLinear


def test_shared_module_gets_one_adapter():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(4, 4, rngs=rngs)
      self.second = self.first

    def __call__(self, x):
      return self.second(jnp.tanh(self.first(x)))

  model = Tied(nnx.Rngs(0))
  x = _rand((3, 4), 0)
  assert jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"first/kernel", rank=RANK, alpha=ALPHA),
                              rngs=nnx.Rngs(1)) == ["first/kernel"]
  assert model.second is model.first and len(jax.tree.leaves(nnx.state(model, LoraParam))) == 2
  _randomize(model)
  p = _weights(model)["first"]
  w = p["kernel"] + SCALE * p["lora_a"] @ p["lora_b"]
  np.testing.assert_allclose(np.asarray(model(x), np.float64), np.tanh(x @ w + p["bias"]) @ w + p["bias"],
                             rtol=1e-5, atol=1e-5)


# --- dropout ---------------------------------------------------------------------------------------------


def _dropout_setup(rate=0.5):
  model, base_out, _, _ = _setup(CASES[0], dropout=rate)
  return model, CASES[0].inputs[0], base_out


def test_dropout_active_in_train_mode_and_matches_masked_formula():
  model, x, _ = _dropout_setup()
  _randomize(model)
  clean = np.asarray(nnx.view(model, deterministic=True)(x))
  y1, y2 = np.asarray(model(x)), np.asarray(model(x))
  assert not np.allclose(y1, clean) and not np.allclose(y1, y2), "a fresh mask per call"
  # y = base + s * (x_drop @ A) @ B, x_drop elementwise in {0, x / (1 - p)}: find such a mask for every
  # row by enumerating the 2^4 possibilities.
  p = _weights(model)["proj"]
  update = ((y1 - (x @ p["kernel"] + p["bias"])) / SCALE).reshape(-1, 5)
  masks = np.array([[(bits >> i) & 1 for i in range(4)] for bits in range(16)])
  for row, x_row in zip(update, x.reshape(-1, 4)):
    assert min(np.abs(((x_row * keep * 2.0) @ p["lora_a"]) @ p["lora_b"] - row).max() for keep in masks) < 1e-4


def test_dropout_off_in_eval_mode():
  model, x, _ = _dropout_setup()
  _randomize(model)
  want = CASES[0].reference(_weights(model), {"proj/kernel": SCALE}, x)
  model.eval()
  np.testing.assert_allclose(np.asarray(model(x), np.float64), want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(model(x), model(x))
  model.train()
  assert not np.allclose(model(x), want, atol=1e-3)


def test_dropout_never_touches_the_frozen_path():
  model, x, base_out = _dropout_setup()  # B = 0: the output must be the base's exactly
  chex.assert_trees_all_equal(model(x), base_out)


def test_dropout_under_jit_advances_the_rng():
  model, x, _ = _dropout_setup()
  _randomize(model)
  forward = nnx.jit(lambda model, x: model(x))
  y1, y2 = forward(model, x), forward(model, x)
  assert not np.allclose(y1, y2)
  assert int(model.proj.lora_rngs.count[...]) == 2


def test_adapters_start_in_the_models_mode():
  class WithDropout(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(4, 5, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  config = jlora.LoraConfig(targets=r"proj/kernel", rank=RANK, dropout=0.5)
  for evaluating in (False, True):
    model = WithDropout(nnx.Rngs(0))
    if evaluating:
      model.eval()
    jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(1))
    assert model.proj.deterministic is evaluating


def test_dropout_needs_an_rng_stream():
  model = nnx.clone(_base(CASES[0])[0])
  with pytest.raises(jlora.JloraError, match="'dropout'"):
    jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"proj/kernel", dropout=0.1), rngs=nnx.Rngs(params=0))
  assert not nnx.state(model, LoraParam), "nothing is modified when apply_lora raises"


# --- loud errors ---------------------------------------------------------------------------------------


class Custom(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jnp.ones((4, 4)))

  def __call__(self, x):
    return x @ self.w[...]


class OverridingLinear(nnx.Linear):
  def __call__(self, x):
    return super().__call__(x) * 2


class Zoo(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 4, rngs=rngs)
    self.custom = Custom(rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
    self.masked = nnx.Conv(4, 4, (3,), mask=jnp.ones((3, 4, 4)), rngs=rngs)
    self.overriding = OverridingLinear(4, 4, rngs=rngs)
    self.peft_style = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
    self.transposed = nnx.ConvTranspose(4, 4, (3,), rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.diagonal = nnx.Einsum("bd,dd->bd", (4, 4), rngs=rngs)


@pytest.mark.parametrize("targets, message", [
    (r"proj/kernal", r"'proj/kernal' matches no variable path.*Near misses: \['proj/kernel'"),
    ((r"proj/kernel", r"nowhere/.*"), r"'nowhere/\.\*' matches no variable path"),
    (r"proj/bias", r"'proj/bias' is the 'bias' Param of Linear; jlora adapts only its 'kernel'"),
    (r"custom/w", r"'custom/w' is the 'w' Param of Custom; jlora adapts only the kernels of nnx.Linear"),
    (r"norm/scale", r"'norm/scale' is the 'scale' Param of LayerNorm"),
    (r"bn/mean", r"'bn/mean' is the 'mean' BatchStat of BatchNorm"),
    (r"grouped/kernel", r"'grouped/kernel' \(Conv\) has feature_group_count=2"),
    (r"masked/kernel", r"'masked/kernel' \(Conv\) has a kernel mask"),
    (r"overriding/kernel", r"OverridingLinear, a subclass of nnx.Linear that overrides"),
    (r"peft_style/kernel", r"LoRALinear, a subclass of nnx.Linear that overrides"),
    (r"transposed/kernel", r"'transposed/kernel' is the 'kernel' Param of ConvTranspose"),
    (r"diagonal/kernel", r"'diagonal/kernel' \(Einsum\): kernel subscripts 'dd' repeat a letter"),
    (r"drop/rngs/key", r"'drop/rngs/key' is a RngKey inside a RngStream"),
    (r".*/kernel", r"'(diagonal|grouped|masked|overriding|peft_style|transposed)/kernel'"),
])
def test_unusable_targets_raise_and_modify_nothing(targets, message):
  if "zoo" not in _BASES:
    _BASES["zoo"] = Zoo(nnx.Rngs(0))
  model = nnx.clone(_BASES["zoo"])
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with pytest.raises(jlora.JloraError, match=message):
    jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=targets), rngs=nnx.Rngs(1))
  assert nnx.graphdef(model) == graphdef
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)


def test_a_kernel_is_adapted_once():
  model = nnx.clone(_base(CASES[-1])[0])
  config = jlora.LoraConfig(targets=r"head/kernel")
  jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(1))
  with pytest.raises(jlora.JloraError, match="'head/kernel' already has a LoRA adapter"):
    jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(1))
  # Adapting other kernels later is fine; jlora's own variables are never candidates.
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"blocks/0/up/kernel"), rngs=nnx.Rngs(1))
  with pytest.raises(jlora.JloraError, match="matches no variable path"):
    jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r".*/lora_a"), rngs=nnx.Rngs(1))


def test_a_kernel_shared_between_modules_is_refused():
  class SharedKernel(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 4, rngs=rngs)
      self.b = nnx.Linear(4, 4, rngs=rngs)
      self.b.kernel = self.a.kernel

  with pytest.raises(jlora.JloraError, match=r"'a/kernel' is the same variable as \['b/kernel'\]"):
    jlora.nnx.apply_lora(SharedKernel(nnx.Rngs(0)), jlora.LoraConfig(targets=r"a/kernel"), rngs=nnx.Rngs(1))


def test_merge_state_errors():
  model = nnx.clone(_base(CASES[0])[0])
  with pytest.raises(jlora.JloraError, match="no LoRA adapters"):
    jlora.nnx.merge(model)
  with pytest.raises(jlora.JloraError, match="no LoRA adapters"):
    jlora.nnx.merged_copy(model)
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"proj/kernel"), rngs=nnx.Rngs(1))
  with pytest.raises(jlora.JloraError, match=r"\['proj/kernel'\] are not merged"):
    jlora.nnx.unmerge(model)
  jlora.nnx.merge(model)
  with pytest.raises(jlora.JloraError, match=r"\['proj/kernel'\] are merged already"):
    jlora.nnx.merge(model)


def test_einsum_called_with_another_equation_is_refused():
  model = nnx.clone(_base(CASES[4])[0])  # 'bnd,ndh->bnh': d is contracted, h is the output
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"proj/kernel"), rngs=nnx.Rngs(1))
  with pytest.raises(jlora.JloraError, match="other roles"):
    nnx.eval_shape(lambda m, x: m.proj(x, einsum_str="bnh,ndh->bnd"), model, _rand((2, 3, 5), 0))


def test_loaded_adapters_of_the_wrong_rank_are_refused():
  model = nnx.clone(_base(CASES[0])[0])
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"proj/kernel", rank=2), rngs=nnx.Rngs(1))
  model.proj.lora_a = LoraParam(jnp.zeros((4, 3)))
  model.proj.lora_b = LoraParam(jnp.zeros((3, 5)))
  with pytest.raises(jlora.JloraError, match=r"needs \(4, 2\)"):
    model(CASES[0].inputs[0])


def test_linen_modules_are_pointed_to_jlora_lora():
  with pytest.raises(jlora.JloraError, match="jlora.Lora"):
    jlora.nnx.apply_lora(nn.Dense(3), jlora.LoraConfig(targets="kernel"), rngs=nnx.Rngs(0))


# --- the same as linen --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("linen_name, nnx_name", [
    ("dense", "linear"),
    ("dense_general", "linear_general_multi_axis"),
    ("dense_general_batch_dims", "linear_general_batch_axis"),
    ("einsum_interleaved", "einsum_interleaved"),
    ("einsum_per_head", "einsum_per_head"),
    ("conv", "conv_strided"),
    ("embed_tied", "embed_tied"),
])
def test_same_output_and_adapter_layout_as_linen(linen_name, nnx_name, variant):
  """Same weights, same adapters: jlora.Lora on the linen model and jlora.nnx on its nnx twin agree."""
  linen_case = next(c for c in LINEN_CASES if c.name == linen_name)
  nnx_case = next(c for c in CASES if c.name == nnx_name)
  config = jlora.LoraConfig(targets=linen_case.targets, rank=RANK, alpha=ALPHA, **VARIANTS[variant])
  inputs = linen_case.inputs
  params = linen_case.model.init(jax.random.key(0), *inputs)["params"]
  lora = jlora.Lora(linen_case.model, config)
  adapters = lora.init(jax.random.key(1), params, *inputs)
  rng = np.random.default_rng(4)
  adapters = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(v * np.exp(0.3 * rng.normal(size=v.shape)) if path[-1].key == "lora_magnitude"
                                  else 0.5 * rng.normal(size=v.shape), v.dtype), adapters)

  model = nnx.clone(_base(nnx_case)[0])
  assert jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(1)) == list(lora.targets)
  # The nnx tree holds lora_a / lora_b beside the kernel where linen's adapter tree nests them under it.
  pure = jax.tree.map(lambda v: v, params)
  for path in lora.targets:
    *owner, kernel = path.split("/")
    node, factors = pure, adapters
    for key in owner:
      node, factors = node[key], factors[key]
    node.update(factors[kernel])
  state = nnx.state(model, nnx.Any(nnx.Param, LoraParam))
  chex.assert_trees_all_equal_shapes(nnx.to_pure_dict(state), pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)

  chex.assert_trees_all_close(model(*inputs), lora.apply(params, adapters, *inputs), rtol=1e-6, atol=1e-6)
  merged = nnx.to_pure_dict(nnx.state(jlora.nnx.merged_copy(model), nnx.Param))
  chex.assert_trees_all_close(merged, lora.merge(params, adapters), rtol=1e-6, atol=1e-6)


# --- stacked layers (nnx.vmap + nnx.scan) ------------------------------------------------------------------


class ScanBlock(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.fc(x))


class ScannedStack(nnx.Module):
  """Three layers created under nnx.vmap (kernels (3, 4, 4)) and run through nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return ScanBlock(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(layer, x):
      return layer(x)

    return self.head(step(self.layers, x))


def _ref_scanned(w, s, x):
  fc = w["layers"]["fc"]
  for i in range(3):
    x = np.tanh(x @ fc["kernel"][i] + fc["bias"][i] + s * (x @ fc["lora_a"][i]) @ fc["lora_b"][i])
  return x @ w["head"]["kernel"] + w["head"]["bias"]


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_stacked_layers(variant):
  model = ScannedStack(nnx.Rngs(0))
  x = _rand((2, 4), 6)
  base_out = model(x)
  config = jlora.LoraConfig(targets=r"layers/fc/kernel", rank=RANK, alpha=ALPHA, dropout=0.5, **VARIANTS[variant])
  jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(params=1, dropout=2))
  expected = {"layers/fc/lora_a": (3, 4, RANK), "layers/fc/lora_b": (3, RANK, 4)}
  if variant == "dora":
    expected["layers/fc/lora_magnitude"] = (3, 4)  # one magnitude per layer and output feature
  assert {k: v.shape for k, v in _flat(nnx.state(model, LoraParam)).items()} == expected
  model.eval()
  if variant == "lora":
    chex.assert_trees_all_equal(model(x), base_out)
  else:
    chex.assert_trees_all_close(model(x), base_out, **IDENTITY_TOL)
  _randomize(model)
  adapted = model(x)
  weights, scale = _weights(model), SCALE
  if variant == "dora":  # the base formula on each layer's DoRA kernel
    fc = weights["layers"]["fc"]
    fc["kernel"] = np_dora_kernel(fc["kernel"], fc, SCALE, KernelLayout((4, 4), (), (0,), (1,)))
    scale = 0.0
  np.testing.assert_allclose(np.asarray(adapted, np.float64), _ref_scanned(weights, scale, x), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jlora.nnx.merged_copy(model)(x), adapted, rtol=1e-5, atol=1e-5)
  model.train()  # per-layer dropout streams, sliced by the scan like the kernels
  y1, y2 = model(x), model(x)
  assert not np.allclose(y1, adapted) and not np.allclose(y1, y2)
  with pytest.raises(jlora.JloraError, match="stacked kernel: call it inside nnx.scan"):
    model.layers(x)


# --- shardings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_adapters_are_sharded_like_their_kernel(variant):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    model = nnx.Linear(8, 16, kernel_metadata={"out_sharding": ("data", "model")}, rngs=nnx.Rngs(0))
  kernel_sharding = model.kernel.get_value().sharding
  assert kernel_sharding.spec == jax.P("data", "model")
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="kernel", rank=4, **VARIANTS[variant]), rngs=nnx.Rngs(1))
  assert model.lora_a.get_value().sharding == jax.NamedSharding(mesh, jax.P("data", None))
  assert model.lora_b.get_value().sharding == jax.NamedSharding(mesh, jax.P(None, "model"))
  assert model.lora_b.get_metadata("out_sharding") == (None, "model")
  if variant == "dora":  # the magnitude is split like the kernel's output axis
    assert model.lora_magnitude.get_value().sharding == jax.NamedSharding(mesh, jax.P("model"))
    assert model.lora_magnitude.get_metadata("out_sharding") == ("model",)
  _randomize(model)
  x = _rand((4, 8), 0)
  y = model(x)
  jlora.nnx.merge(model)
  assert model.kernel.get_value().sharding == kernel_sharding
  chex.assert_trees_all_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_single_row_embedding_broadcasts_like_nnx():
  model = nnx.Embed(1, 4, rngs=nnx.Rngs(0))
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="embedding", rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(1))
  _randomize(model)
  w = _weights(model)
  row = w["embedding"][0] + SCALE * (w["lora_a"] @ w["lora_b"])[0]
  np.testing.assert_allclose(np.asarray(model(np.zeros((2, 3), np.int32)), np.float64),
                             np.broadcast_to(row, (2, 3, 4)), rtol=1e-6, atol=1e-6)
