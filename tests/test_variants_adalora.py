"""AdaLoRA against PEFT's AdaLoRA (``peft.tuners.adalora``): layers, regulariser, rank allocator, files both ways.

PEFT is the reference: the same weights go into a torch model wrapped by ``peft.get_peft_model`` and into its linen
twin adapted by ``jlora.Lora``; the rank allocator is driven by the same synthetic gradients on both sides and
compared step by step (budgets, sensitivity/uncertainty EMAs, triplet scores, masks, the masked ``E``). The
conformance properties (every module kind AdaLoRA adapts, scan/remat/vmap, bf16, jit, merge, nnx) run in
tests/test_lora.py and tests/test_nnx.py.
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
import torch
from _cases import ScannedStack, TiedEmbed
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from peft.optimizers import create_loraplus_optimizer
from test_models_references import tiny_hf_model
from test_peft import ALLOW_NO_FINGERPRINT, IDS, MASK, _close, _jlora_outputs, _torch_outputs, bases  # noqa: F401

import jlora
import jlora.nnx
import jlora.peft
from jlora import sharding
from jlora._adalora import budget_table, triplet_scores
from jlora.peft._modules import module_table

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

RANK = 3
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 on both sides, products in another order


class TorchPair(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(8, 6)
    self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)


class Pair(nn.Module):
  """The linen twin: nn.Dense and an NHWC nn.Conv with the same geometry."""

  @nn.compact
  def __call__(self, x, image):
    return nn.Dense(6, name="proj")(x), nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(image)


RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 5, 8)).astype(np.float32)
IMAGE = RNG.normal(size=(2, 7, 8, 3)).astype(np.float32)  # NHWC; torch sees it as NCHW
CONFIG = jlora.LoraConfig(targets=r"(proj|conv)/kernel", variant="adalora", init_rank=RANK, target_rank=1,
                          total_step=10, alpha=5.0)


def _peft_pair(seed=0):
  torch.manual_seed(seed)
  model = peft.get_peft_model(TorchPair(), peft.AdaLoraConfig(init_r=RANK, target_r=1, total_step=10, lora_alpha=5,
                                                              target_modules=["proj", "conv"]))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.copy_(torch.randn_like(param) * (1.0 if "lora_E" in name else 0.3))
  return model


def _jlora_twin(peft_model):
  """The same weights as jlora trees (copies: torch's .numpy() shares memory with what merge_and_unload writes)."""
  base = peft_model.base_model.model

  def t(x):
    return np.array(x.detach().numpy())

  proj, conv = base.proj, base.conv
  params = {"proj": {"kernel": t(proj.base_layer.weight).T, "bias": t(proj.base_layer.bias)},
            "conv": {"kernel": t(conv.base_layer.weight).transpose(2, 3, 1, 0), "bias": t(conv.base_layer.bias)}}
  conv_a = t(conv.lora_A["default"]).reshape(RANK, 3, 3, 3).transpose(2, 3, 1, 0)  # (r, in*kh*kw) -> (kh, kw, in, r)
  adapters = {"proj": {"kernel": {"lora_a": t(proj.lora_A["default"]).T, "lora_e": t(proj.lora_E["default"])[:, 0],
                                  "lora_b": t(proj.lora_B["default"]).T}},
              "conv": {"kernel": {"lora_a": conv_a, "lora_e": t(conv.lora_E["default"])[:, 0],
                                  "lora_b": t(conv.lora_B["default"]).T}}}
  return params, adapters


def test_outputs_gradients_and_merge_equal_peft():
  """SVDLinear and SVDConv2d: the output, the gradient of every leaf, and the merged kernels."""
  peft_model = _peft_pair()
  params, adapters = _jlora_twin(peft_model)
  lora = jlora.Lora(Pair(), CONFIG)
  lora.trace(params, X, IMAGE)
  assert {t.scale for t in lora.targets.values()} == {5.0 / (RANK + 1e-5)}  # PEFT: lora_alpha / (ranknum + 1e-5)
  y_proj, y_conv = peft_model.proj(torch.from_numpy(X)), peft_model.conv(torch.from_numpy(IMAGE.transpose(0, 3, 1, 2)))
  ((y_proj**2).sum() + (y_conv**2).sum()).backward()

  def loss(a):
    proj, conv = lora.apply(params, a, X, IMAGE)
    return jnp.sum(proj**2) + jnp.sum(conv**2), (proj, conv)

  grads, (proj, conv) = jax.grad(loss, has_aux=True)(adapters)
  np.testing.assert_allclose(np.asarray(proj), y_proj.detach().numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(conv), y_conv.detach().numpy().transpose(0, 2, 3, 1), **TOL)
  torch_grads = _jlora_twin_grads(peft_model)
  jax.tree.map(lambda g, want: np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4), grads,
               torch_grads)
  merged = lora.merge(params, adapters)
  unloaded = peft_model.merge_and_unload()
  np.testing.assert_allclose(merged["proj"]["kernel"], unloaded.proj.weight.detach().numpy().T, **TOL)
  np.testing.assert_allclose(merged["conv"]["kernel"], unloaded.conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                             **TOL)
  np.testing.assert_allclose(lora.unmerge(merged, adapters)["conv"]["kernel"], params["conv"]["kernel"], **TOL)


def _jlora_twin_grads(peft_model):
  """PEFT's gradients laid out like jlora's adapter tree (the twin's mapping applied to .grad)."""
  grads = {}
  for name, module in (("proj", peft_model.base_model.model.proj), ("conv", peft_model.base_model.model.conv)):
    a = module.lora_A["default"].grad.numpy()
    a = a.T if name == "proj" else a.reshape(RANK, 3, 3, 3).transpose(2, 3, 1, 0)
    grads[name] = {"kernel": {"lora_a": a, "lora_e": module.lora_E["default"].grad.numpy()[:, 0],
                              "lora_b": module.lora_B["default"].grad.numpy().T}}
  return grads


def test_orthogonal_regulariser_equals_peft(bases, tmp_path):  # noqa: F811 (test_peft's fixture)
  """PEFT adds orth_reg_weight * mean ||P P^T - I||, ||Q^T Q - I|| to the model's loss; every layer of jlora's
  stacked (nn.scan) factors is one matrix of that mean. At orthonormal factors its gradient is 0, not NaN."""
  model, params = bases("llama", True)
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(tiny_hf_model("llama"), peft.AdaLoraConfig(
      init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "down_proj"], orth_reg_weight=0.3)).eval()
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_" in name:
        param.copy_(0.3 * torch.randn_like(param))
  peft_model.save_pretrained(tmp_path)
  ids = torch.from_numpy(IDS.astype(np.int64))
  with torch.no_grad():  # AdaLoraModel.forward adds the regulariser (PeftModelForCausalLM's forward, in PEFT 0.21.2, not)
    with_reg = peft_model.base_model(input_ids=ids, labels=ids).loss.item()
    without = peft_model.base_model.model(input_ids=ids, labels=ids).loss.item()
  adapters, config = jlora.peft.from_pretrained(tmp_path, model, params, IDS, MASK, policy=ALLOW_NO_FINGERPRINT)
  assert config.orth_reg_weight == 0.3
  np.testing.assert_allclose(float(jlora.adalora_orth_loss(adapters, config)), with_reg - without, rtol=1e-5)
  orthonormal = {"k": {"lora_a": jnp.eye(5, 3), "lora_e": jnp.ones(3), "lora_b": jnp.eye(3, 4)}}
  grads = jax.grad(lambda a: jlora.adalora_orth_loss(a, config))(orthonormal)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


# --- the rank allocator ------------------------------------------------------------------------------------------

TOTAL, TINIT, TFINAL, DELTA_T, LR = 12, 2, 3, 2, 0.05


def _allocation_pair(bases, tmp_path):  # noqa: F811
  """PEFT's AdaLoRA on the tiny Llama (q_proj, v_proj: 4 modules) and jlora's stacked twin, equal adapters."""
  model, params = bases("llama", True)
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(tiny_hf_model("llama"), peft.AdaLoraConfig(
      init_r=6, target_r=3, total_step=TOTAL, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, beta1=0.8, beta2=0.9,
      target_modules=["q_proj", "v_proj"]))
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_" in name:
        param.copy_(0.3 * torch.randn_like(param))
  peft_model.save_pretrained(tmp_path)
  adapters, config = jlora.peft.from_pretrained(tmp_path, model, params, IDS, MASK, policy=ALLOW_NO_FINGERPRINT)
  return model, params, peft_model, adapters, config


def _leaf(tree, name, modules):
  """Where PEFT's parameter ``name`` is in a jlora tree: ``(node, leaf, layer)``; ``...layers.1.self_attn.q_proj.
  lora_A.default`` is layer 1 of ``model/layers/self_attn/q_proj/kernel``'s ``lora_a`` (``modules``: the model's
  ``jlora.peft`` module table by name)."""
  module, leaf = name.removeprefix("base_model.model.").rsplit(".", 2)[:2]
  hf = modules[module]
  node = tree
  for key in hf.path.split("/"):
    node = node[key]
  return node, f"lora_{leaf[-1].lower()}", hf.layer


def _peft_layout(value, leaf):
  """A jlora leaf of one layer in PEFT's layout: A (r, in), B (out, r), E (r, 1)."""
  return value.T if leaf in ("lora_a", "lora_b") else value[:, None]


def test_allocator_equals_peft_rank_allocator(bases, tmp_path):  # noqa: F811
  """Both sides take the same gradients and the same SGD step for TOTAL steps; after each, PEFT's
  update_and_allocate(t) and jlora's allocator agree on the budget, the EMAs, the triplet scores, the masks and the
  masked E. Then jlora's adapter at its allocated ranks equals PEFT's saved one, logits included."""
  model, params, peft_model, adapters, config = _allocation_pair(bases, tmp_path / "start")
  modules = {m.name: m for m in module_table(model.config).modules}
  allocator = peft_model.base_model.rankallocator
  final = TOTAL - TFINAL
  assert (allocator.init_bgt, allocator.target_bgt) == (24, 12)
  # The cubic schedule from tinit to total_step - tfinal, computed as PEFT computes it (float64, truncated).
  table = budget_table(24, 12, config)
  assert table.tolist() == [allocator.budget_schedule(t)[0] for t in range(TINIT + 1, final + 1)]
  tx = jlora.adalora_allocator(optax.sgd(LR), config)
  state = tx.init(adapters)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  lora_params = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
  for t in range(TOTAL):
    grads = jax.tree.map(np.zeros_like, jax.tree.map(np.asarray, adapters))
    for name, param in lora_params:
      g = rng.normal(size=param.shape).astype(np.float32)
      param.grad = torch.from_numpy(g)
      node, leaf, layer = _leaf(grads, name, modules)
      node[leaf][layer] = _peft_layout(g, leaf).reshape(node[leaf][layer].shape)
    with torch.no_grad():
      for _, param in lora_params:
        param.add_(param.grad, alpha=-LR)
    peft_model.base_model.update_and_allocate(t)
    updates, state = update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)

    if t <= final:
      assert int(state.budget) == allocator.budget_schedule(t)[0]
    for name, param in lora_params:  # the parameters, masked E included
      node, leaf, layer = _leaf(adapters, name, modules)
      np.testing.assert_allclose(_peft_layout(np.asarray(node[leaf][layer]), leaf),
                                 param.detach().numpy().reshape(_peft_layout(node[leaf][layer], leaf).shape),
                                 rtol=1e-5, atol=1e-6)
    if t < final:  # the EMAs (PEFT resets them at the final allocation; so does jlora)
      for name, _ in lora_params:
        for ema, theirs in ((state.exp_avg_ipt, allocator.exp_avg_ipt), (state.exp_avg_unc, allocator.exp_avg_unc)):
          node, leaf, layer = _leaf(_nested(ema), name, modules)
          np.testing.assert_allclose(_peft_layout(np.asarray(node[leaf][layer]), leaf), theirs[name.removeprefix("base_model.model.")].numpy(),
                                     rtol=1e-5, atol=1e-9)
      _check_scores(state, allocator, modules)
    allocates = (TINIT < t < final and t % DELTA_T == 0) or t == final
    if allocates:  # the masks: PEFT's rank_pattern (True: kept)
      pattern = peft_model.peft_config["default"].rank_pattern
      for key, kept in pattern.items():
        module = modules[key.removesuffix(".lora_E.default")]
        assert np.asarray(state.masks[module.path])[module.layer].tolist() == kept, (t, key)
  assert int(state.budget) == 12 and sum(int(np.sum(m)) for m in state.masks.values()) == 12

  # The final adapter at its allocated ranks: PEFT's own saved file and jlora's resize compute the same.
  resized, resized_config = jlora.adalora_resize(adapters, state.masks, config)
  peft_model.eval().save_pretrained(tmp_path / "theirs")
  expected = _torch_outputs("llama", peft_model)
  ours = _jlora_outputs(model, params, resized, resized_config)
  _close(ours, expected)
  _close(_jlora_outputs(model, params, adapters, config), expected)
  theirs, their_config = jlora.peft.from_pretrained(tmp_path / "theirs", model, params, IDS, MASK,
                                                    policy=ALLOW_NO_FINGERPRINT)
  assert their_config.rank_pattern == resized_config.rank_pattern  # one rank per stacked kernel: its largest layer
  _close(_jlora_outputs(model, params, theirs, their_config), expected)


def _nested(ema):
  """The allocator's ``{kernel path: {leaf: array}}`` as a tree nested like the adapters."""
  tree = {}
  for path, leaves in ema.items():
    node = tree
    for key in path.split("/"):
      node = node.setdefault(key, {})
    node.update(leaves)
  return tree


def _check_scores(state, allocator, modules):
  """The triplet scores, PEFT's way (RankAllocator._element_score and _combine_ipt, as in mask_to_budget)."""
  for path, ipt in state.exp_avg_ipt.items():
    ours = np.asarray(triplet_scores(ipt, state.exp_avg_unc[path], ipt["lora_e"].ndim))
    for module in (m for m in modules.values() if m.path == path):
      name = f"{module.name}.lora_%s.default"  # the allocator's names: of the transformers model
      a = torch.mean(allocator._element_score(name % "A"), dim=1, keepdim=True)
      b = torch.mean(allocator._element_score(name % "B"), dim=0, keepdim=False).view(-1, 1)
      theirs = allocator._combine_ipt(allocator._element_score(name % "E"), torch.cat([a, b], dim=1)).numpy()
      np.testing.assert_allclose(ours[module.layer], theirs, rtol=1e-5, atol=1e-12)


def test_allocator_runs_on_nnx_and_under_jit():
  """The allocator on an nnx model (nnx.Optimizer over LoraParam): at the end, exactly target_rank triplets live."""
  model = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  config = jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=4, target_rank=2, total_step=6, tinit=1)
  jlora.nnx.apply_lora(model, config, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, jlora.adalora_allocator(optax.adam(0.1), config), wrt=jlora.nnx.LoraParam)

  @nnx.jit
  def step(model, optimizer, x):
    loss = lambda m: jnp.sum(m(x) ** 2) + jlora.adalora_orth_loss(nnx.state(m, jlora.nnx.LoraParam), config)  # noqa
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jlora.nnx.LoraParam))(model)
    optimizer.update(model, grads)

  for _ in range(8):
    step(model, optimizer, jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32))
  masks = optimizer.opt_state.masks[""][...]
  assert int(masks.sum()) == 2
  np.testing.assert_array_equal(np.asarray(model.lora_e[...]) != 0, np.asarray(masks))


def test_resize_keeps_the_output_and_pads_stacked_layers(tmp_path):
  """Kept triplets in order, pruned ones dropped; a stacked kernel keeps its largest layer's rank, the other layers
  padded with pruned triplets at E = 0; a kernel that keeps nothing keeps one such triplet."""
  model, x = ScannedStack(), np.asarray(RNG.normal(size=(2, 4)), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets=r".*/kernel", variant="adalora", init_rank=4, target_rank=1, total_step=10)
  lora = jlora.Lora(model, config)
  adapters = lora.init(jax.random.key(1), params, x)
  adapters["layers"]["fc"]["kernel"]["lora_e"] = 1.0 + jnp.arange(12.0).reshape(3, 4)  # E: 1..4, 5..8, 9..12
  adapters["head"]["kernel"]["lora_e"] = jnp.ones(4)
  masks = {"layers/fc/kernel": np.array([[True, False, True, False], [False, False, False, True],
                                         [True, True, True, False]]),
           "head/kernel": np.zeros(4, bool)}
  masked = jax.tree_util.tree_map_with_path(
      lambda p, v: v * masks["/".join(k.key for k in p[:-1])] if p[-1].key == "lora_e" else v, adapters)
  resized, resized_config = jlora.adalora_resize(adapters, masks, config)
  assert resized_config.rank_pattern == {"layers/fc/kernel": 3, "head/kernel": 1}
  fc = resized["layers"]["fc"]["kernel"]
  assert fc["lora_a"].shape == (3, 4, 3) and fc["lora_b"].shape == (3, 3, 4)
  np.testing.assert_array_equal(fc["lora_e"], [[1.0, 3.0, 0.0], [8.0, 0.0, 0.0], [9.0, 10.0, 11.0]])
  np.testing.assert_array_equal(fc["lora_a"][1], adapters["layers"]["fc"]["kernel"]["lora_a"][1][:, [3, 0, 1]])
  assert not np.any(resized["head"]["kernel"]["lora_e"])
  np.testing.assert_allclose(jlora.Lora(model, resized_config).apply(params, resized, x),
                             lora.apply(params, masked, x), rtol=1e-6, atol=1e-6)
  with pytest.raises(jlora.JloraError, match="masks are for"):
    jlora.adalora_resize(adapters, {"head/kernel": masks["head/kernel"]}, config)
  # The adapter checkpoint records the allocated ranks, and checks the tree against them.
  resized_lora = jlora.Lora(model, resized_config)
  resized_lora.trace(params, x)
  jlora.save_adapters(tmp_path / "a", resized, resized_config, base_fingerprint=jlora.fingerprint(params))
  loaded, loaded_config = jlora.load_adapters(tmp_path / "a", jax.eval_shape(lambda: resized), params=params,
                                              lora=resized_lora)
  assert loaded_config == resized_config
  jlora.save_adapters(tmp_path / "b", resized, config, base_fingerprint=jlora.fingerprint(params))
  with pytest.raises(jlora.UnsafeAdapterError, match="has rank 3, the config says 4"):
    jlora.load_adapters(tmp_path / "b", jax.eval_shape(lambda: resized), params=params)


def test_config_checks():
  for options, match in (({}, "total_step must be a positive int"),
                         ({"total_step": 10, "target_rank": 12}, "below init_rank"),
                         ({"total_step": 10, "tinit": 8, "tfinal": 2}, "no budgeting phase"),
                         ({"total_step": 10, "rank": 4}, "does not take"),
                         ({"total_step": 10, "alpha_pattern": {"x": 1.0}}, "does not take"),
                         ({"total_step": 10, "use_rslora": True}, "does not take"),
                         ({"total_step": 10, "beta1": 1.0}, "beta1"),
                         ({"total_step": 10, "alpha": 0.0}, "alpha must be positive"),
                         ({"total_step": 10, "rank_pattern": {"x": 13}}, "never above"),
                         ({"total_step": 10, "d_initial": 0.1}, "another variant")):
    with pytest.raises(jlora.JloraError, match=match):
      jlora.LoraConfig(targets="kernel", variant="adalora", **options)
  config = jlora.LoraConfig(targets="kernel", variant="adalora", rank=12, total_step=10)  # rank may repeat init_rank
  assert config.init_rank == 12 and config.rank_for("kernel") == 12
  assert jlora.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  ids = np.zeros((1, 3), np.int32)
  params = TiedEmbed().init(jax.random.key(0), ids)["params"]
  with pytest.raises(jlora.JloraError, match="AdaLoRA cannot adapt.*no embeddings"):
    jlora.Lora(TiedEmbed(), jlora.LoraConfig(targets=r"embed/embedding", variant="adalora", total_step=10)).init(
        jax.random.key(1), params, ids)
  with pytest.raises(jlora.JloraError, match="not below the initial one"):
    one = {"k": {"lora_a": jnp.ones((3, 2)), "lora_e": jnp.ones(2), "lora_b": jnp.ones((2, 3))}}
    jlora.adalora_allocator(optax.sgd(0.1), jlora.LoraConfig(targets="k", variant="adalora", init_rank=3,
                                                             target_rank=2, total_step=5)).init(one)


def test_lora_plus_groups_equal_peft():
  """PEFT's create_loraplus_optimizer: lora_B at lr * ratio; lora_A and lora_E (a (r, 1) matrix) at lr."""
  peft_model = _peft_pair()
  optimizer = create_loraplus_optimizer(peft_model, torch.optim.SGD, lr=1.0, loraplus_lr_ratio=16.0)
  names = {id(p): n for n, p in peft_model.named_parameters()}
  peft_lr = {names[id(p)].split(".")[-2]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
  assert peft_lr == {"lora_A": 1.0, "lora_E": 1.0, "lora_B": 16.0}
  _, adapters = _jlora_twin(peft_model)
  tx = jlora.lora_plus(optax.sgd, 1.0, ratio=16.0)
  updates, _ = tx.update(jax.tree.map(np.ones_like, adapters), tx.init(adapters))
  for node in updates.values():
    for leaf, update in node["kernel"].items():
      np.testing.assert_allclose(update, -peft_lr[{"lora_a": "lora_A", "lora_e": "lora_E", "lora_b": "lora_B"}[leaf]])


# --- PEFT files on the reference models -----------------------------------------------------------------------


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "unrolled"])
def test_jlora_adalora_export_loads_in_peft(scan, bases, tmp_path):  # noqa: F811
  """A resized jlora adapter (GPT-2's Conv1D, ranks pruned per kernel) loads in PEFT with its rank_pattern and the
  same logits; back in jlora it is the same adapter."""
  model, params = bases("gpt2", scan)
  config = jlora.LoraConfig(targets=r".*/(c_attn|c_fc)/kernel", variant="adalora", init_rank=4, target_rank=2,
                            total_step=10, alpha=6.0)
  lora = jlora.Lora(model, config)
  adapters = jax.tree.map(lambda v: v + 0.3 * np.random.default_rng(v.size).normal(size=v.shape).astype(np.float32),
                          lora.init(jax.random.key(0), params, IDS, MASK))
  nodes = {p: t for p, t in lora.targets.items()}
  rng = np.random.default_rng(1)
  masks = {p: rng.random(t.stack_shape + (4,)) < 0.5 for p, t in nodes.items()}
  resized, resized_config = jlora.adalora_resize(adapters, masks, config)
  ours = _jlora_outputs(model, params, resized, resized_config)
  written = jlora.peft.save_pretrained(tmp_path, resized, resized_config, model, params=params)
  assert written["peft_type"] == "ADALORA" and written["init_r"] == 4 and written["fan_in_fan_out"]
  assert all(len(kept) == 4 for kept in written["rank_pattern"].values())
  peft_model = peft.PeftModel.from_pretrained(tiny_hf_model("gpt2"), tmp_path).eval()
  _close(_torch_outputs("gpt2", peft_model), ours)
  assert np.abs(ours - _torch_outputs("gpt2", tiny_hf_model("gpt2")))[MASK.astype(bool)].max() > 1e-2
  loaded, loaded_config = jlora.peft.from_pretrained(tmp_path, model, params, IDS, MASK)
  assert loaded_config.rank_pattern == resized_config.rank_pattern
  jax.tree.map(np.testing.assert_array_equal, loaded, resized)


def test_peft_adalora_refusals(bases, tmp_path):  # noqa: F811
  model, params = bases("llama", True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft.get_peft_model(tiny_hf_model("llama"), peft.AdaLoraConfig(init_r=4, total_step=10, target_r=2,
                                                                   target_modules=["q_proj"])).save_pretrained(tmp_path)
  raw = json.loads((tmp_path / "adapter_config.json").read_text())
  for change, match in (({"use_rslora": True}, "use_rslora"), ({"lora_alpha": 0}, "lora_alpha"),
                        ({"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True]}}, "rank_pattern"),
                        ({"rank_pattern": {"model.layers.0.self_attn.k_proj.lora_E": [True] * 4}}, "not adapted"),
                        ({"target_r": 4}, "below init_rank")):
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(jlora.UnsafeAdapterError, match=match):
      jlora.peft.from_pretrained(tmp_path, model, params, policy=ALLOW_NO_FINGERPRINT)


def test_sharded_adalora_equals_unsharded():
  """Each leaf split like the kernel axes it stands for: on a per-head einsum (a kernel-batch axis n), E is split
  like n, A like n and the input axis, B like n and the output axis; the rank axis never."""
  model = nn.Einsum((4, 6, 8), "bnd,ndh->bnh", use_bias=False, name="proj")
  x = RNG.normal(size=(2, 4, 6)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=2, target_rank=1, total_step=10)
  lora = jlora.Lora(model, config)
  adapters = jax.tree.map(lambda v: v + 0.5, lora.init(jax.random.key(1), params, x))
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  specs = {"kernel": P("data", None, "tensor")}
  adapter_specs = sharding.adapter_specs(adapters, specs, lora.targets)
  assert adapter_specs == {"kernel": {"lora_a": P("data", None, None), "lora_e": P("data", None),
                                      "lora_b": P("data", None, "tensor")}}
  place = jax.tree.map(lambda s: NamedSharding(mesh, s), (specs, adapter_specs))
  sharded = jax.device_put((params, adapters), place)
  got = jax.jit(lambda p, a: lora.apply(p, a, x))(*sharded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(lora.apply(params, adapters, x)), **TOL)
