"""VeRA against PEFT's VeRA (``peft.tuners.vera``): outputs, gradients, merging, PEFT files both ways, the paper's count.

PEFT is the reference: the same weights, and the same projections (PEFT's ``vera_A``/``vera_B`` buffers copied,
since JAX cannot replay torch's generator), go into a torch model wrapped by ``peft.get_peft_model`` and into its
linen twin adapted by ``jlora.Lora``. The conformance properties (every module kind VeRA adapts, scan/remat/vmap,
bf16, jit, merge, nnx) run in tests/test_lora.py and tests/test_nnx.py.
"""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import safetensors.numpy
import torch
from _cases import StridedConv, TiedEmbed
from flax import nnx
from jax.sharding import PartitionSpec as P
from peft.optimizers import create_loraplus_optimizer
from test_models_references import tiny_hf_model
from test_peft import ALLOW_NO_FINGERPRINT, IDS, MASK, _close, _jlora_outputs, _torch_outputs, bases  # noqa: F401

import jlora
import jlora.nnx
import jlora.peft
from jlora import models, sharding
from jlora.nnx._adapted import LoraModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RANK = 4
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides, products in another order


class TorchPair(torch.nn.Module):
  """Two Linear layers of different shapes, so each uses another block of the shared projections."""

  def __init__(self):
    super().__init__()
    self.up = torch.nn.Linear(8, 12)
    self.down = torch.nn.Linear(12, 5)

  def forward(self, x):
    return self.down(torch.tanh(self.up(x)))


class Pair(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="down")(jnp.tanh(nn.Dense(12, name="up")(x)))


X = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
CONFIG = jlora.LoraConfig(targets=r"(up|down)/kernel", variant="vera", rank=RANK)


def _peft_pair(seed=0):
  """PEFT's VeRA on TorchPair, with random (trained-looking) lambda_b and lambda_d."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(TorchPair(), peft.VeraConfig(r=RANK, target_modules=["up", "down"]))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "vera_lambda" in name:
        param.copy_(torch.randn_like(param))
  return model


def _jlora_twin(peft_model):
  """The same base weights, projections (PEFT's buffers, transposed) and lambdas as jlora trees."""
  base = peft_model.base_model.model
  # Copies: torch's .numpy() shares memory, and merge_and_unload writes into the weights.
  params = {name: {"kernel": np.array(getattr(base, name).base_layer.weight.detach().numpy().T),
                   "bias": np.array(getattr(base, name).base_layer.bias.detach().numpy())} for name in ("up", "down")}
  adapters = {name: {"kernel": {leaf: np.array(getattr(getattr(base, name), leaf)["default"].detach().numpy())
                                for leaf in ("vera_lambda_b", "vera_lambda_d")}} for name in ("up", "down")}
  state = {"vera_a": np.array(peft_model.base_model.vera_A["default"].numpy().T),
           "vera_b": np.array(peft_model.base_model.vera_B["default"].numpy().T)}
  return {**params, jlora.STATE_KEY: {"vera": state}}, adapters


def test_projections_are_drawn_from_the_config_seed():
  """Sized to the largest targeted fan-in/fan-out (PEFT's _find_dim), drawn as PEFT draws them (kaiming-uniform, gain
  sqrt(2)), from projection_seed alone: the init key does not change them, another seed does."""
  params = Pair().init(jax.random.key(0), X)["params"]
  lora = jlora.Lora(Pair(), jlora.LoraConfig(targets=r"(up|down)/kernel", variant="vera", rank=64))
  first, adapters = lora.init_with_base(jax.random.key(1), params, X)
  again, _ = lora.init_with_base(jax.random.key(2), params, X)
  other, _ = jlora.Lora(Pair(), jlora.LoraConfig(targets=r"(up|down)/kernel", variant="vera", rank=64,
                                                  projection_seed=1)).init_with_base(jax.random.key(1), params, X)
  state = first[jlora.STATE_KEY]["vera"]
  assert state["vera_a"].shape == (12, 64) and state["vera_b"].shape == (64, 12)  # max fan-in 12, max fan-out 12
  jax.tree.map(np.testing.assert_array_equal, again[jlora.STATE_KEY], first[jlora.STATE_KEY])
  assert not np.array_equal(other[jlora.STATE_KEY]["vera"]["vera_a"], state["vera_a"])
  for name, fan in (("vera_a", 12), ("vera_b", 64)):  # U(-b, b), b = sqrt(6 / fan): |x| <= b, variance b^2 / 3
    values, bound = np.asarray(state[name], np.float64), np.sqrt(6 / fan)
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound
    np.testing.assert_allclose(values.var(), bound**2 / 3, rtol=0.15)
  assert params is not first and jlora.STATE_KEY not in params  # functional: the caller's tree is unchanged
  with pytest.raises(jlora.JloraError, match="init_with_base"):
    lora.init(jax.random.key(1), params, X)
  with pytest.raises(jlora.JloraError, match="shared frozen state"):
    lora.apply(params, adapters, X)


def test_outputs_gradients_and_merge_equal_peft():
  peft_model = _peft_pair()
  params, adapters = _jlora_twin(peft_model)
  lora = jlora.Lora(Pair(), CONFIG)
  lora.trace(params, X)
  x = torch.from_numpy(X)
  y_torch = peft_model(x)
  (y_torch**2).sum().backward()
  y_jlora = lora.apply(params, adapters, X)
  np.testing.assert_allclose(np.asarray(y_jlora), y_torch.detach().numpy(), **TOL)
  grads = jax.grad(lambda a: jnp.sum(lora.apply(params, a, X) ** 2))(adapters)
  for name in ("up", "down"):
    for leaf in ("vera_lambda_b", "vera_lambda_d"):
      torch_grad = getattr(getattr(peft_model.base_model.model, name), leaf)["default"].grad.numpy()
      np.testing.assert_allclose(np.asarray(grads[name]["kernel"][leaf]), torch_grad, **TOL)
  # Merging: PEFT's merge_and_unload gives the same kernels as jlora's merge (which drops the projections).
  merged = lora.merge(params, adapters)
  assert jlora.STATE_KEY not in merged
  unloaded = peft_model.merge_and_unload()
  for name in ("up", "down"):
    np.testing.assert_allclose(merged[name]["kernel"], getattr(unloaded, name).weight.detach().numpy().T, **TOL)
  unmerged = lora.unmerge({**merged, jlora.STATE_KEY: params[jlora.STATE_KEY]}, adapters)
  np.testing.assert_allclose(unmerged["up"]["kernel"], params["up"]["kernel"], **TOL)


def test_refuses_what_peft_refuses():
  """Like PEFT's VeRA (Linear and Conv1D only): no convolutions, no embeddings, in linen and nnx; no rank or alpha
  patterns, no DoRA; another variant's options are refused too."""
  for model, targets, inputs in ((StridedConv(), r"conv/kernel", np.zeros((1, 5, 5, 3), np.float32)),
                                 (TiedEmbed(), r"embed/embedding", np.zeros((1, 3), np.int32))):
    params = model.init(jax.random.key(0), inputs)["params"]
    with pytest.raises(jlora.JloraError, match="VeRA cannot adapt.*no convolutions or embeddings"):
      jlora.Lora(model, jlora.LoraConfig(targets=targets, variant="vera")).init_with_base(jax.random.key(1), params,
                                                                                           inputs)
  conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(jlora.JloraError, match="VeRA cannot adapt"):
    jlora.nnx.apply_lora(conv, jlora.LoraConfig(targets="kernel", variant="vera"), rngs=nnx.Rngs(1))
  assert not isinstance(conv, LoraModule)
  for options, match in (({"rank_pattern": {"up/kernel": 2}}, "does not take"), ({"alpha_pattern": {"x": 2.0}},
                         "does not take"), ({"use_dora": True}, "DoRA"), ({"total_step": 10}, "another variant"),
                         ({"projection_seed": -1}, "projection_seed"), ({"d_initial": float("nan")}, "d_initial")):
    with pytest.raises(jlora.JloraError, match=match):
      jlora.LoraConfig(targets="kernel", variant="vera", **options)
  with pytest.raises(jlora.JloraError, match="another variant"):
    jlora.LoraConfig(targets="kernel", projection_seed=3)


def test_config_round_trip_and_adapter_checkpoint(tmp_path):
  config = jlora.LoraConfig(targets=r"(up|down)/kernel", variant="vera", rank=RANK, projection_seed=7, d_initial=0.05)
  assert jlora.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  assert "init_rank" not in config.to_dict() and "projection_seed" not in jlora.LoraConfig(targets="x").to_dict()
  params = Pair().init(jax.random.key(0), X)["params"]
  lora = jlora.Lora(Pair(), config)
  with_state, adapters = lora.init_with_base(jax.random.key(1), params, X)
  assert float(adapters["up"]["kernel"]["vera_lambda_d"][0]) == pytest.approx(0.05)
  adapters = jax.tree.map(lambda v: v + 0.1, adapters)
  # The base fingerprint covers the projections: adapters saved with it load only where the same projections are.
  jlora.save_adapters(tmp_path / "a", adapters, config, base_fingerprint=jlora.fingerprint(with_state))
  loaded, loaded_config = jlora.load_adapters(tmp_path / "a", jax.eval_shape(lambda: adapters), params=with_state,
                                              lora=lora)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
  rebuilt, _ = jlora.Lora(Pair(), loaded_config).init_with_base(jax.random.key(5), params, X)
  jax.tree.map(np.testing.assert_array_equal, rebuilt[jlora.STATE_KEY], with_state[jlora.STATE_KEY])
  other, _ = jlora.Lora(Pair(), jlora.LoraConfig(**{**config.to_dict(), "projection_seed": 8})).init_with_base(
      jax.random.key(1), params, X)
  with pytest.raises(jlora.UnsafeAdapterError, match="different base"):
    jlora.load_adapters(tmp_path / "a", jax.eval_shape(lambda: adapters), params=other)


def test_lora_plus_groups_equal_peft():
  """PEFT's create_loraplus_optimizer puts one-dimensional parameters (both lambdas) at lr * ratio."""
  peft_model = _peft_pair()
  optimizer = create_loraplus_optimizer(peft_model, torch.optim.SGD, lr=1.0, loraplus_lr_ratio=16.0)
  names = {id(p): n for n, p in peft_model.named_parameters()}
  peft_lr = {names[id(p)].split(".")[-2]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
  assert peft_lr == {"vera_lambda_b": 16.0, "vera_lambda_d": 16.0}
  _, adapters = _jlora_twin(peft_model)
  tx = jlora.lora_plus(optax.sgd, 1.0, ratio=16.0)
  updates, _ = tx.update(jax.tree.map(np.ones_like, adapters), tx.init(adapters))
  for node in updates.values():
    for leaf, update in node["kernel"].items():
      np.testing.assert_allclose(update, -peft_lr[leaf])


def test_projections_are_replicated_and_lambdas_split_like_the_kernel():
  model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4))
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|down_proj)/kernel", variant="vera", rank=RANK))
  with_state, adapters = jax.eval_shape(lambda p: lora.init_with_base(jax.random.key(1), p, ids), shapes)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  specs = sharding.param_specs(with_state, sharding.rules_for(model), mesh)
  assert specs[jlora.STATE_KEY] == {"vera": {"vera_a": P(), "vera_b": P()}}
  layers = specs["model"]["layers"]
  got = sharding.adapter_specs(adapters, specs, lora.targets)["model"]["layers"]
  for module, kernel in (("self_attn", "q_proj"), ("mlp", "down_proj")):
    kernel_spec = layers[module][kernel]["kernel"]  # (layers, in, out)
    assert got[module][kernel]["kernel"] == {"vera_lambda_b": P(kernel_spec[0], kernel_spec[2]),
                                             "vera_lambda_d": P(kernel_spec[0], None)}


def test_nnx_stacked_layers_broadcast_the_shared_projections():
  """In nnx the projections are one LoraState shared by every adapted module: a model that scans layers created under
  nnx.vmap broadcasts it (StateAxes {LoraState: None}) while it slices the layers' own variables."""
  from test_nnx import ScannedStack, _rand

  model = ScannedStack(nnx.Rngs(0))
  x = _rand((2, 4), 6)
  jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"layers/fc/kernel", variant="vera", rank=2),
                       rngs=nnx.Rngs(params=1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.5, nnx.state(model, jlora.nnx.LoraParam)))

  @nnx.scan(in_axes=(nnx.StateAxes({jlora.nnx.LoraState: None, ...: 0}), nnx.Carry), out_axes=nnx.Carry)
  def layers(layer, x):
    return layer(x)

  got = model.head(layers(model.layers, x))
  fc = model.layers.fc
  state = fc.lora_state_value()
  w = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  want = np.asarray(x, np.float64)
  for i in range(3):
    a = np.asarray(state["vera_a"], np.float64)[:4] * np.asarray(fc.vera_lambda_d[...][i], np.float64)
    b = np.asarray(state["vera_b"], np.float64)[:, :4] * np.asarray(fc.vera_lambda_b[...][i], np.float64)
    want = np.tanh(want @ w["layers"]["fc"]["kernel"][i] + w["layers"]["fc"]["bias"][i] + (want @ a) @ b)
  want = want @ w["head"]["kernel"] + w["head"]["bias"]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL)


# --- PEFT files on the reference models -----------------------------------------------------------------------


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_peft_vera_files_load_with_equal_logits(arch, targets, bases, tmp_path):  # noqa: F811 (test_peft's fixture)
  """A trained PEFT VeRA adapter (llama: three kernel shapes; GPT-2: Conv1D) loads with the projections its file
  stores, and jlora's export of it loads back in PEFT: equal logits both ways, PEFT's key names and config."""
  model, params = bases(arch, True)
  torch.manual_seed(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.get_peft_model(tiny_hf_model(arch), peft.VeraConfig(r=8, target_modules=targets,
                                                                          projection_prng_key=3, d_initial=0.2))
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "vera_lambda" in name:
        param.copy_(0.3 * torch.randn_like(param) + 0.3)
  peft_model.eval().save_pretrained(tmp_path / "theirs")
  expected = _torch_outputs(arch, peft_model)
  assert np.abs(expected - _torch_outputs(arch, tiny_hf_model(arch)))[MASK.astype(bool)].max() > 1e-2

  with pytest.raises(jlora.JloraError, match="from_pretrained_with_base"):
    jlora.peft.from_pretrained(tmp_path / "theirs", model, params, policy=ALLOW_NO_FINGERPRINT)
  with_state, adapters, config = jlora.peft.from_pretrained_with_base(tmp_path / "theirs", model, params, IDS, MASK,
                                                                       policy=ALLOW_NO_FINGERPRINT)
  assert (config.variant, config.rank, config.projection_seed, config.d_initial) == ("vera", 8, 3, 0.2)
  assert jlora.STATE_KEY not in params  # the caller's params are not modified
  ours = _jlora_outputs(model, with_state, adapters, config)
  _close(ours, expected)

  written = jlora.peft.save_pretrained(tmp_path / "ours", adapters, config, model, params=with_state)
  reloaded = peft.PeftModel.from_pretrained(tiny_hf_model(arch), tmp_path / "ours").eval()
  _close(_torch_outputs(arch, reloaded), ours)
  our_tensors = safetensors.numpy.load_file(tmp_path / "ours" / "adapter_model.safetensors")
  their_tensors = safetensors.numpy.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
  assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in their_tensors.items()}
  jax.tree.map(np.testing.assert_array_equal, our_tensors, their_tensors)  # the very values, round-tripped
  their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
  for key, value in written.items():
    if key not in ("auto_mapping", "task_type", "peft_version"):
      assert (set(value) == set(their_config[key])) if key == "target_modules" else their_config[key] == value, key


def test_jlora_vera_export_loads_in_peft(bases, tmp_path):  # noqa: F811
  """An adapter jlora drew (projections from the seed) and trained: PEFT loads the projections from the file."""
  model, params = bases("llama", True)
  config = jlora.LoraConfig(targets=r".*/(k_proj|up_proj)/kernel", variant="vera", rank=RANK)
  lora = jlora.Lora(model, config)
  with_state, adapters = lora.init_with_base(jax.random.key(0), params, IDS, MASK)
  adapters = jax.tree.map(lambda v: v + np.random.default_rng(0).normal(size=v.shape).astype(np.float32), adapters)
  ours = _jlora_outputs(model, with_state, adapters, config)
  # Without params, the export draws the same projections from the config's seed.
  jlora.peft.save_pretrained(tmp_path / "ours", adapters, config, model)
  peft_model = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), tmp_path / "ours").eval()
  _close(_torch_outputs("llama", peft_model), ours)
  assert np.abs(ours - _torch_outputs("llama", tiny_hf_model("llama")))[MASK.astype(bool)].max() > 1e-2
  with pytest.raises(jlora.JloraError, match="save_projection=True"):
    jlora.peft.save_pretrained(tmp_path / "no", adapters, jlora.LoraConfig(**{**config.to_dict(),
                                                                               "save_projection": False}), model)


def test_peft_vera_refusals(bases, tmp_path):  # noqa: F811
  model, params = bases("llama", True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft.get_peft_model(tiny_hf_model("llama"), peft.VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
                        ).save_pretrained(tmp_path / "unsaved")
    peft.get_peft_model(tiny_hf_model("llama"), peft.VeraConfig(r=4, target_modules=["q_proj"])
                        ).save_pretrained(tmp_path / "good")
  with pytest.raises(jlora.UnsafeAdapterError, match="save_projection=False"):
    jlora.peft.from_pretrained_with_base(tmp_path / "unsaved", model, params, policy=ALLOW_NO_FINGERPRINT)
  # The shared projections are checked like every tensor: a file whose vera_A does not fit the adapted modules.
  tensors = safetensors.numpy.load_file(tmp_path / "good" / "adapter_model.safetensors")
  tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :8]
  (tmp_path / "cut").mkdir()
  safetensors.numpy.save_file(tensors, tmp_path / "cut" / "adapter_model.safetensors", metadata={"format": "pt"})
  (tmp_path / "cut" / "adapter_config.json").write_bytes((tmp_path / "good" / "adapter_config.json").read_bytes())
  with pytest.raises(jlora.UnsafeAdapterError, match="base_model.vera_A"):
    jlora.peft.from_pretrained_with_base(tmp_path / "cut", model, params, policy=ALLOW_NO_FINGERPRINT)
  with pytest.raises(jlora.UnsafeAdapterError, match="allow_missing_fingerprint"):
    jlora.peft.from_pretrained_with_base(tmp_path / "good", model, params)


# --- the VeRA paper's count -----------------------------------------------------------------------------------


def test_gpt2_medium_parameter_counts_of_the_vera_and_lora_papers():
  """VeRA (Kopiczko et al., 2024, Table 2): r=1024 on the query and value projections of GPT-2 Medium's 24 layers
  trains 0.098M parameters; LoRA r=4 on the same projections is listed at 0.35M (Hu et al., 2021).

  GPT-2 fuses query, key and value into one Conv1D ``c_attn`` (1024 -> 3072), which jlora (like PEFT) adapts as
  one kernel: VeRA on it trains ``lambda_b`` for all 3072 outputs and one ``lambda_d`` (1024 + 3072 per layer),
  LoRA r=4 ``A`` (1024 x 4) and ``B`` (4 x 3072). Separate query and value projections would train two ``lambda_b``
  of 1024 and two ``lambda_d`` of 1024 (VeRA), two ``A`` and two ``B`` of 1024 x 4 (LoRA): the same totals,
  4096 and 16384 per layer. So both counts equal the papers' "query and value" figures, computed by jax.eval_shape
  on the real GPT-2 Medium config; LoRA's is 24 * 16384 = 393,216 (0.39M), above the 0.35M the papers print.
  """
  config = models.GPT2Config(n_embd=1024, n_layer=24, n_head=16)
  model = models.GPT2LMHeadModel(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]

  def trainable(lora_config):
    lora = jlora.Lora(model, lora_config)
    _, adapters = jax.eval_shape(lambda p: lora.init_with_base(jax.random.key(1), p, ids), params)
    return sum(leaf.size for leaf in jax.tree.leaves(adapters))

  vera = trainable(jlora.LoraConfig(targets=r".*/attn/c_attn/kernel", variant="vera", rank=1024))
  lora = trainable(jlora.LoraConfig(targets=r".*/attn/c_attn/kernel", rank=4))
  per_layer_q_and_v = {"vera": 2 * (1024 + 1024), "lora": 2 * (1024 * 4 + 4 * 1024)}
  assert vera == 24 * per_layer_q_and_v["vera"] == 98_304  # 0.098M, as the VeRA paper
  assert lora == 24 * per_layer_q_and_v["lora"] == 393_216  # 0.39M; the papers print 0.35M
  assert round(vera / 1e6, 3) == 0.098


def test_sharded_vera_equals_unsharded():
  """param_specs replicates the projections (no rule needed), adapter_specs splits lambda_b like the kernel's output
  axes: a jitted apply on 8 devices computes what one device does."""
  model = nn.Einsum((2, 4, 8), "btd,ndh->btnh", name="proj")
  x = np.random.default_rng(1).normal(size=(4, 3, 4)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", variant="vera", rank=RANK))
  with_state, adapters = lora.init_with_base(jax.random.key(1), params, x)
  adapters = jax.tree.map(lambda v: v + 0.5, adapters)
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  specs = sharding.param_specs(with_state, [("kernel", P("data", None, "tensor")), ("bias", P("data", "tensor"))],
                               mesh)
  adapter_specs = sharding.adapter_specs(adapters, specs, lora.targets)
  assert adapter_specs == {"kernel": {"vera_lambda_b": P("data", "tensor"), "vera_lambda_d": P(None)}}
  sharded = jax.device_put((with_state, adapters), sharding.named((specs, adapter_specs), mesh))
  got = jax.jit(lambda p, a: lora.apply(p, a, x))(*sharded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(lora.apply(with_state, adapters, x)), **TOL)
  assert sharded[0][jlora.STATE_KEY]["vera"]["vera_a"].sharding.spec == P()
