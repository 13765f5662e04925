"""jlora.combine against PEFT's add_weighted_adapter on the same adapters, and its own guarantees.

The PEFT comparisons load three or four jlora adapters (non-zero A and B, different targets, alphas and ranks,
one rsLoRA) exported with jlora.peft.save_pretrained into one PeftModel on a tiny transformers Llama, combine them
there and here, and compare the combined adapter's factors (factor-wise methods and cat) or merged updates
``s·B@A`` per module (svd methods, whose factors have arbitrary signs) within 1e-5 in float32. jlora's side is
compared through its PEFT export, so the result is also shown to be an ordinary, exportable adapter.
"""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from test_models_references import save_hf, tiny_hf_model
from test_safe_load import random_like

import jlora
import jlora.peft
from jlora import models
from jlora._combine_reductions import random_prune, reduce

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ATOL = 1e-5
IDS = np.zeros((1, 2), np.int32)
HF_SIZE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
# All but "narrow" have PEFT rank 4, as the factor-wise methods require; "narrow" has ranks 2 and 3. Each of
# x, y, z lacks one of the three kernels the others adapt.
ADAPTERS = {
    "x": dict(targets=r".*/(q_proj|v_proj)/kernel", rank=4, alpha=8.0),
    "y": dict(targets=r".*/(q_proj|o_proj)/kernel", rank=4, alpha=3.0, alpha_pattern={r".*/o_proj/kernel": 5.0}),
    "z": dict(targets=r".*/(o_proj|v_proj)/kernel", rank=4, alpha=4.0, use_rslora=True),
    "narrow": dict(targets=r".*/(q_proj|v_proj)/kernel", rank=2, alpha=2.0, rank_pattern={r".*/v_proj/kernel": 3}),
}
WEIGHTS = [0.7, -0.4, 1.3]


@dataclasses.dataclass
class Setup:
  model: nn.Module
  params: dict
  adapters: dict
  configs: dict
  peft_model: peft.PeftModel
  tmp: object

  def inputs(self, names):
    return [(self.adapters[n], self.configs[n]) for n in names]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny scanned Llama, four adapters, and one PeftModel holding all four (loaded from jlora's export)."""
  tmp = tmp_path_factory.mktemp("combine")
  model, params = models.from_pretrained(save_hf(tiny_hf_model("llama", **HF_SIZE), tmp / "base"), scan_layers=True)
  adapters, configs = {}, {}
  peft_model = None
  for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
    configs[name] = jlora.LoraConfig(**kwargs)
    shapes = jax.eval_shape(jlora.Lora(model, configs[name]).init, jax.random.key(0), params, IDS)
    adapters[name] = random_like(shapes, seed=10 + seed, scale=0.1)
    jlora.peft.save_pretrained(tmp / name, adapters[name], configs[name], model, params=params)
    if peft_model is None:
      peft_model = peft.PeftModel.from_pretrained(tiny_hf_model("llama", **HF_SIZE), tmp / name, adapter_name=name)
    else:
      peft_model.load_adapter(tmp / name, adapter_name=name)
  return Setup(model, params, adapters, configs, peft_model, tmp)


def _peft_combined(setup, names, combined_name, **kwargs):
  """{module: (A (r, in), B (out, r), scaling)} of PEFT's combined adapter, and its config."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # PEFT warns that density 1 prunes nothing
    setup.peft_model.add_weighted_adapter(names, WEIGHTS[:len(names)], combined_name, **kwargs)
  factors = {}
  for name, module in setup.peft_model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer) and combined_name in module.lora_A:
      factors[name.removeprefix("base_model.model.")] = (
          module.lora_A[combined_name].weight.detach().numpy(), module.lora_B[combined_name].weight.detach().numpy(),
          module.scaling[combined_name])
  return factors, setup.peft_model.peft_config[combined_name]


def _jlora_combined(setup, names, tag, **kwargs):
  """The same {module: (A, B, scaling)} for jlora.combine's result, read back from its PEFT export."""
  adapters, config = jlora.combine(setup.model, setup.params, setup.inputs(names), WEIGHTS[:len(names)], IDS,
                                   **kwargs)
  written = jlora.peft.save_pretrained(setup.tmp / tag, adapters, config, setup.model)
  tensors = safetensors.numpy.load_file(setup.tmp / tag / "adapter_model.safetensors")
  assert written["rank_pattern"] == written["alpha_pattern"] == {}  # one rank and scale everywhere, as in PEFT
  factors = {}
  for key in tensors:
    if key.endswith(".lora_A.weight"):
      module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
      factors[module] = (tensors[key], tensors[key.replace("lora_A", "lora_B")], written["lora_alpha"] / written["r"])
  return factors, config, written


def _same_modules(ours, theirs):
  assert sorted(ours) == sorted(theirs)
  assert len(ours) >= 4  # two layers, two or three kernels


METHOD_CASES = {  # id -> add_weighted_adapter kwargs; jlora gets the same plus key= for DARE
    "linear": dict(combination_type="linear"),
    "ties": dict(combination_type="ties", density=0.6),
    "ties_frequency": dict(combination_type="ties", density=0.4, majority_sign_method="frequency"),
    "magnitude_prune": dict(combination_type="magnitude_prune", density=0.5),
    # DARE is random; at density 1 it keeps everything, and what is left is its deterministic part
    # (rescaling, sign election, disjoint merge). Its randomness is tested statistically below.
    "dare_ties": dict(combination_type="dare_ties", density=1.0, majority_sign_method="frequency"),
}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_factorwise_methods_equal_peft(setup, case):
  kwargs = METHOD_CASES[case]
  names = ["x", "y", "z"]  # different targets (a module missing from an input), alphas and an rsLoRA scale
  theirs, their_config = _peft_combined(setup, names, f"f_{case}", **kwargs)
  key = {"key": jax.random.key(0)} if kwargs["combination_type"].startswith("dare") else {}
  ours, config, written = _jlora_combined(setup, names, f"f_{case}", **kwargs, **key)
  assert (written["r"], written["lora_alpha"]) == (their_config.r, their_config.lora_alpha) == (4, 4)
  assert not config.use_rslora and config.scale_for("any", config.rank) == 1.0
  _same_modules(ours, theirs)
  for module, (a, b, scale) in theirs.items():
    np.testing.assert_allclose(ours[module][0], a, rtol=0, atol=ATOL, err_msg=module)
    np.testing.assert_allclose(ours[module][1], b, rtol=0, atol=ATOL, err_msg=module)
    assert ours[module][2] == scale == 1.0
  assert any(np.abs(a).max() > 0.05 for a, _, _ in ours.values())


def test_cat_equals_peft_and_is_exact(setup):
  names = ["x", "y", "narrow"]  # ranks 4, 4 and (2, 3): cat has rank 4 + 4 + 3, zero-padded where unused
  theirs, their_config = _peft_combined(setup, names, "cat", combination_type="cat")
  ours, config, written = _jlora_combined(setup, names, "cat", combination_type="cat")
  assert written["r"] == written["lora_alpha"] == their_config.r == config.rank == 11
  _same_modules(ours, theirs)
  for module, (a, b, _) in theirs.items():
    np.testing.assert_allclose(ours[module][0], a, rtol=0, atol=ATOL, err_msg=module)
    np.testing.assert_allclose(ours[module][1], b, rtol=0, atol=ATOL, err_msg=module)

  # And exact: the merged update is sum_i w_i s_i A_i B_i.
  adapters, config = jlora.combine(setup.model, setup.params, setup.inputs(names), WEIGHTS, IDS, combination_type="cat")
  np.testing.assert_allclose(_delta(setup, adapters, config), _weighted_sum(setup, names), rtol=0, atol=ATOL)


def _delta(setup, adapters, config, path="model/layers/self_attn/q_proj/kernel"):
  lora = jlora.Lora(setup.model, config)
  lora.trace(setup.params, IDS)
  keys = tuple(path.split("/"))
  return np.asarray(jlora._paths.get(lora.merge(setup.params, adapters), keys)) - jlora._paths.get(setup.params, keys)


def _weighted_sum(setup, names, path="model/layers/self_attn/q_proj/kernel"):
  total = 0.0
  for name, weight in zip(names, WEIGHTS):
    lora = jlora.Lora(setup.model, setup.configs[name])
    if path in lora.trace(setup.params, IDS):
      node = jlora._paths.get(setup.adapters[name], tuple(path.split("/")))
      total = total + weight * lora.targets[path].scale * np.einsum("lir,lro->lio", node["lora_a"], node["lora_b"])
  return total


SVD_CASES = {
    "svd": dict(combination_type="svd"),
    "svd_rank2": dict(combination_type="svd", svd_rank=2),
    "ties_svd": dict(combination_type="ties_svd", density=0.5),
    "magnitude_prune_svd": dict(combination_type="magnitude_prune_svd", density=0.7),
    "dare_ties_svd": dict(combination_type="dare_ties_svd", density=1.0, majority_sign_method="frequency"),
}


@pytest.mark.parametrize("case", sorted(SVD_CASES))
def test_svd_methods_equal_peft_updates(setup, case):
  # Both sides truncate the same matrix, so the updates agree whatever the SVD routines; only nearly equal
  # singular values at the cut would make the truncated subspace ill-conditioned. Here the smallest gap
  # sigma_k - sigma_k+1 is 0.6% of sigma_1 and the updates agree to 2e-7, so random adapters suffice.
  kwargs = SVD_CASES[case]
  names = ["x", "y", "narrow"]  # the combined update of q_proj has rank 10, truncated to 4 (or 2)
  theirs, their_config = _peft_combined(setup, names, f"s_{case}", **kwargs)
  key = {"key": jax.random.key(0)} if kwargs["combination_type"].startswith("dare") else {}
  ours, config, written = _jlora_combined(setup, names, f"s_{case}", **kwargs, **key)
  assert written["r"] == their_config.r == config.rank == kwargs.get("svd_rank", 4)
  _same_modules(ours, theirs)
  for module, (a, b, scale) in theirs.items():
    their_delta = scale * b @ a
    our_delta = ours[module][2] * ours[module][1] @ ours[module][0]
    np.testing.assert_allclose(our_delta, their_delta, rtol=0, atol=ATOL, err_msg=module)
    assert np.abs(their_delta).max() > 1e-2


def _canonical_signs(svd):
  """torch.linalg.svd with jlora's sign convention: the largest |entry| of each left singular vector positive."""

  def canonical(matrix, *args, **kwargs):
    u, s, vh = svd(matrix, *args, **kwargs)
    k = s.shape[-1]
    rows = u[..., :k].abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u[..., :k], -2, rows))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, vh = u.clone(), vh.clone()
    u[..., :k] *= sign
    vh[..., :k, :] *= sign.transpose(-1, -2)
    return u, s, vh

  return canonical


def test_svd_clamp_equals_peft(setup, monkeypatch):
  # The clamp clips factor *values*, so its result depends on each singular pair's sign, which SVD routines
  # choose arbitrarily (torch and jax disagree on ~1 in 4 random matrices). jlora fixes the signs; PEFT's SVD
  # is given the same convention here, so both clamp the same factors and even the factors must agree.
  monkeypatch.setattr(torch.linalg, "svd", _canonical_signs(torch.linalg.svd))
  names = ["x", "y", "narrow"]
  kwargs = dict(combination_type="svd", svd_rank=3, svd_clamp=0.8)
  theirs, _ = _peft_combined(setup, names, "clamped", **kwargs)
  ours, _, _ = _jlora_combined(setup, names, "clamped", **kwargs)
  _same_modules(ours, theirs)
  for module, (a, b, _) in theirs.items():
    np.testing.assert_allclose(ours[module][0], a, rtol=0, atol=ATOL, err_msg=module)
    np.testing.assert_allclose(ours[module][1], b, rtol=0, atol=ATOL, err_msg=module)
    values = np.abs(np.concatenate([ours[module][0].ravel(), ours[module][1].ravel()]))
    assert np.sum(values == values.max()) > 5  # the clamp bit: the clipped entries sit at the bound


# --- exactness on every kind of kernel ----------------------------------------------------------------------------


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(8, name="dense")(x), None


class _Kinds(nn.Module):
  """Embed, Conv, a per-head Einsum (a kernel-batch axis), DenseGeneral and scanned Dense kernels."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(16, 8, name="embed")(ids)
    x = nn.Conv(8, (3,), name="conv")(x)
    heads = nn.Einsum((2, 4, 4), "bthd,hde->bthe", use_bias=False, name="per_head")(x.reshape(x.shape[:-1] + (2, 4)))
    x = heads.reshape(x.shape)
    x, _ = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)
    return nn.DenseGeneral((2, 4), name="out")(x)


@pytest.fixture(scope="module")
def kinds():
  model, ids = _Kinds(), np.arange(6, dtype=np.int32).reshape(1, 6)
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), ids)["params"], seed=0, scale=0.3)
  every = r"(embed/embedding|conv/kernel|per_head/kernel|layers/dense/kernel|out/kernel)"
  configs = [jlora.LoraConfig(targets=every, rank=2, alpha=3.0),
             jlora.LoraConfig(targets=r"(conv|per_head|out)/kernel", rank=3, alpha=2.0, use_rslora=True)]
  inputs = []
  for seed, config in enumerate(configs):
    shapes = jax.eval_shape(jlora.Lora(model, config).init, jax.random.key(0), params, ids)
    inputs.append((random_like(shapes, seed=seed + 1, scale=0.1), config))
  return model, params, ids, inputs


def _deltas(model, params, ids, adapters, config):
  lora = jlora.Lora(model, config)
  lora.trace(params, ids)
  merged = lora.merge(params, adapters)
  return {path: np.asarray(jlora._paths.get(merged, tuple(path.split("/"))))
          - jlora._paths.get(params, tuple(path.split("/"))) for path in lora.targets}


@pytest.mark.parametrize("kwargs", [dict(combination_type="cat"), dict(combination_type="svd", svd_rank=5)],
                         ids=["cat", "svd_full_rank"])
def test_cat_and_full_rank_svd_are_exact_on_every_kernel_kind(kinds, kwargs):
  model, params, ids, inputs = kinds
  weights = [0.5, -1.5]
  adapters, config = jlora.combine(model, params, inputs, weights, ids, **kwargs)
  assert config.rank == 5 and config.alpha == 5.0 and not config.rank_pattern
  expected = {}
  for weight, (input_adapters, input_config) in zip(weights, inputs):
    for path, delta in _deltas(model, params, ids, input_adapters, input_config).items():
      expected[path] = expected.get(path, 0.0) + weight * delta
  got = _deltas(model, params, ids, adapters, config)
  assert sorted(got) == sorted(expected) and len(got) == 5
  for path in expected:
    np.testing.assert_allclose(got[path], expected[path], rtol=0, atol=ATOL, err_msg=path)


def test_linear_is_not_the_sum_of_updates(kinds):
  model, params, ids, inputs = kinds
  first, config = inputs[0]
  both = [(first, config), (jax.tree.map(lambda v: -v, first), config)]
  adapters, combined = jlora.combine(model, params, both, [1.0, 1.0], ids, combination_type="linear")
  assert combined.rank == 2 and combined.scale_for("conv/kernel", 2) == 1.0
  # sum_i w_i dW_i would be 2 dW (A_2 B_2 = A_1 B_1), but linear adds the factors, which cancel: no update.
  # (Up to rounding: XLA may fuse w*a + w*(-a) into an FMA, which leaves the rounding error of one product.)
  assert all(np.abs(leaf).max() < 1e-6 for leaf in jax.tree.leaves(adapters))
  assert np.abs(_deltas(model, params, ids, first, config)["conv/kernel"]).max() > 1e-2


def test_an_rslora_adapter_alone_combines_to_itself(kinds):
  # PEFT gives the result the first input's use_rslora, so its scale becomes sqrt(rank) instead of 1 and the
  # combination is sqrt(rank) times too large (huggingface/peft#3449). jlora's result has scale 1, no rsLoRA.
  model, params, ids, inputs = kinds
  adapters, config = jlora.combine(model, params, [inputs[1]], [1.0], ids, combination_type="linear")
  assert inputs[1][1].use_rslora and not config.use_rslora
  got, expected = _deltas(model, params, ids, adapters, config), _deltas(model, params, ids, *inputs[1])
  assert sorted(got) == sorted(expected)
  for path in expected:
    np.testing.assert_allclose(got[path], expected[path], rtol=0, atol=ATOL, err_msg=path)


# --- DARE ----------------------------------------------------------------------------------------------------------


def test_dare_keeps_density_and_the_expectation():
  rng = np.random.default_rng(0)
  tensors = [jnp.asarray(rng.standard_normal((32, 32)), jnp.float32) for _ in range(2)]
  weights = jnp.asarray([0.8, -0.5], jnp.float32)
  density, n_keys = 0.3, 2000
  kept = random_prune(jax.random.key(0), jnp.ones((200_000,)), density)
  assert abs(float(jnp.mean(kept != 0)) - density) < 0.005  # 5 sigma: sqrt(0.21 / 2e5) = 0.001
  np.testing.assert_array_equal(np.unique(np.asarray(kept)), np.array([0.0, 1 / density], np.float32))

  @jax.jit
  def mean_over_keys(key):
    def one(k):
      return reduce("dare_linear", tensors, weights, density=density, key=k)
    return jnp.mean(jax.vmap(one)(jax.random.split(key, n_keys)), axis=0)

  mean = np.asarray(mean_over_keys(jax.random.key(1)))
  undropped = np.asarray(reduce("task_arithmetic", tensors, weights))
  # Each entry's mean has std sqrt((1 - d) / d * sum_i (w_i t_i)^2 / n_keys); allow 5 of them.
  sigma = np.sqrt((1 - density) / density * sum((w * t) ** 2 for w, t in zip(np.asarray(weights), tensors)) / n_keys)
  assert np.all(np.abs(mean - undropped) < 5 * sigma + 1e-6)
  assert np.abs(mean - undropped).mean() < 1.2 * np.sqrt(2 / np.pi) * sigma.mean()  # and not merely within 5 sigma


def test_dare_through_combine_is_keyed(setup):
  names = ["x", "y"]
  kwargs = dict(combination_type="dare_linear", density=0.25)
  with pytest.raises(jlora.JloraError, match="key=jax.random.key"):
    jlora.combine(setup.model, setup.params, setup.inputs(names), WEIGHTS[:2], IDS, **kwargs)
  results = [jlora.combine(setup.model, setup.params, setup.inputs(names), WEIGHTS[:2], IDS, key=jax.random.key(k),
                           **kwargs)[0] for k in (0, 0, 1)]
  leaves = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(r)]) for r in results]
  np.testing.assert_array_equal(leaves[0], leaves[1])
  assert not np.array_equal(leaves[0], leaves[2])
  # v_proj (x only) and o_proj (y only): one input, so an entry survives with probability 0.25.
  single = [np.ravel(jlora._paths.get(results[0], ("model", "layers", "self_attn", m, "kernel"))[f])
            for m in ("v_proj", "o_proj") for f in ("lora_a", "lora_b")]
  assert abs(np.mean(np.concatenate(single) != 0) - 0.25) < 0.06  # 896 entries: sigma 0.015


# --- refusals --------------------------------------------------------------------------------------------------------


def test_refuses_different_or_missing_fingerprints(setup):
  inputs = setup.inputs(["x", "y"])
  with pytest.raises(jlora.UnsafeAdapterError, match="different base models"):
    jlora.combine(setup.model, setup.params, inputs, [1.0, 1.0], IDS, combination_type="cat",
                  fingerprints=["sha256:aa", "sha256:bb"])
  with pytest.raises(jlora.UnsafeAdapterError, match=r"inputs \[1\] carry no base fingerprint"):
    jlora.combine(setup.model, setup.params, inputs, [1.0, 1.0], IDS, combination_type="cat",
                  fingerprints=["sha256:aa", None])
  jlora.combine(setup.model, setup.params, inputs, [1.0, 1.0], IDS, combination_type="cat",
                fingerprints=["sha256:aa", None], policy=jlora.LoadPolicy(allow_missing_fingerprint=True))


@pytest.mark.parametrize("inputs, kwargs, message", [
    (["x", "narrow"], dict(combination_type="ties", density=0.5), r"same rank .* ranks are \[4, 3\]"),
    (["x", "y"], dict(combination_type="svd", density=0.5), r"\['density'\] do nothing"),
    (["x", "y"], dict(combination_type="linear", key=jax.random.key(0)), r"\['key'\] do nothing"),
    (["x", "y"], dict(combination_type="ties"), "needs density in"),
    (["x", "y"], dict(combination_type="dare_ties", density=0.0, key=jax.random.key(0)), r"needs density in \(0, 1\]"),
    (["x", "y"], dict(combination_type="svd", svd_driver="gesvda"), "no jax equivalent"),
    (["x", "y"], dict(combination_type="mean"), "is not one of"),
    (["x", "dora"], dict(combination_type="cat"), "use_dora=True.*plain LoRA"),
    (["x", "swapped"], dict(combination_type="cat"), "pass each adapter with its own config"),
    (["x", "pissa"], dict(combination_type="cat"), "input 1 has init='pissa'.*to_plain_lora"),
], ids=["ranks", "density_unused", "key_unused", "density_missing", "dare_density_0", "driver", "method", "variant",
        "tree", "residual_base"])
def test_refusals(setup, inputs, kwargs, message):
  known = {**{n: (setup.adapters[n], setup.configs[n]) for n in ADAPTERS},
           "dora": (setup.adapters["x"], jlora.LoraConfig(**ADAPTERS["x"], use_dora=True)),
           "swapped": (setup.adapters["y"], setup.configs["x"]),
           "pissa": (setup.adapters["y"], jlora.LoraConfig(**{**ADAPTERS["y"], "init": "pissa"}))}
  with pytest.raises(jlora.JloraError, match=message):
    jlora.combine(setup.model, setup.params, [known[n] for n in inputs], [1.0, 1.0], IDS, **kwargs)


# --- norms across inputs (issue 16.7) -------------------------------------------------------------------------------


def test_an_outsized_input_stands_out(setup):
  # max_relative_update is lifted so that only the comparison between inputs can flag: within its own norm
  # report the scaled adapter is uniform (every module x100) and is not an outlier.
  policy = jlora.LoadPolicy(max_relative_update=1e6)
  inputs = setup.inputs(["x", "y", "z"])
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.AdapterNormWarning)
    jlora.combine(setup.model, setup.params, inputs, WEIGHTS, IDS, combination_type="cat", policy=policy)

  loud = jax.tree.map(lambda v: v, setup.adapters["y"])
  for node in (loud["model"]["layers"]["self_attn"]["q_proj"]["kernel"], loud["model"]["layers"]["self_attn"]["o_proj"]["kernel"]):
    node["lora_b"] = 100.0 * node["lora_b"]
  report = jlora.norm_report(_traced(setup, "y"), setup.params, loud, policy)
  assert not report.outliers
  for names in (["x", "loud"], ["x", "loud", "z"]):  # two inputs too: the larger one is the outlier
    inputs = [(loud, setup.configs["y"]) if n == "loud" else (setup.adapters[n], setup.configs[n]) for n in names]
    with pytest.warns(jlora.AdapterNormWarning, match=r"input 1: model/layers/self_attn/q_proj/kernel\[0\].*against the other adapters") as caught:
      jlora.combine(setup.model, setup.params, inputs, WEIGHTS[:len(names)], IDS, combination_type="cat", policy=policy)
    assert "input 0" not in str(caught[0].message) and "input 2" not in str(caught[0].message)
    with pytest.raises(jlora.UnsafeAdapterError, match="input 1: .*Refused"):
      jlora.combine(setup.model, setup.params, inputs, WEIGHTS[:len(names)], IDS, combination_type="cat",
                    policy=dataclasses.replace(policy, strict=True))


def _traced(setup, name):
  lora = jlora.Lora(setup.model, setup.configs[name])
  lora.trace(setup.params, IDS)
  return lora
