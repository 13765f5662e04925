"""jlora.peft against real PEFT: jlora -> PEFT files -> PeftModel, PEFT files -> jlora, merged -> transformers.

Every adapter has non-zero A and B (DoRA: magnitudes away from their init), layers with different ranks/alphas,
and is compared on logits (or BERT hidden states) with the reference at 1e-5: the float32 bases themselves agree
to ~1e-6. PiSSA/OLoRA adapters travel converted to plain LoRA on the original base, as PEFT writes them.
"""

import json
import warnings

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from test_models_references import (
  left_padded_batch,
  position_ids,
  save_hf,
  tiny_hf_model,
  torch_outputs,
)
from test_safe_load import random_like

import jlora
import jlora.peft
from jlora import models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5
IDS, MASK = left_padded_batch(seed=4, length=7, pad=2)
# Hugging Face PEFT writes no base fingerprint; jlora loads such a file only when told to.
ALLOW_NO_FINGERPRINT = jlora.LoadPolicy(allow_missing_fingerprint=True)

# arch -> (jlora LoraConfig kwargs, scan_layers). Patterns and rsLoRA make ranks and scales differ per module.
EXPORT_CASES = {
    "llama": (dict(targets=r".*/(q_proj|v_proj|o_proj|down_proj)/kernel",
                   rank_pattern={r".*/v_proj/kernel": 2, r".*down.*": 3}, alpha_pattern={r".*/o_proj/kernel": 3.0}),
              True),
    "gpt2": (dict(targets=r".*/(c_attn|c_proj)/kernel", use_rslora=True, rank_pattern={r".*/mlp/c_proj/kernel": 2}),
             True),
    "bert": (dict(targets=r".*/attention/self/(query|value)/kernel", alpha_pattern={r"encoder/layer_1/.*": 2.0}), False),
    "mistral": (dict(targets=r".*/(k_proj|gate_proj)/kernel", rank_pattern={r".*/gate_proj/kernel": 6}), True),
    "qwen2": (dict(targets=r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel", use_rslora=True,
                   alpha_pattern={r".*/mlp/.*": 4.0}), True),
    "gemma": (dict(targets=r".*/(q_proj|v_proj)/kernel", rank_pattern={r"model/layers_1/self_attn/v_proj/kernel": 2}),
              False),
    # A tied embedding: jlora's adapter acts on the lookup and the LM head; PEFT needs ensure_weight_tying.
    "llama3_rope": (dict(targets=[r".*/q_proj/kernel", r"model/embed_tokens/embedding"]), True),
    # DoRA: lora_magnitude_vector per module, with GPT-2's Conv1D (fan_in_fan_out) and BERT's biases.
    "llama+dora": (dict(targets=r".*/(q_proj|v_proj|down_proj)/kernel", rank_pattern={r".*/v_proj/kernel": 2},
                        use_dora=True), True),
    "gpt2+dora": (dict(targets=r".*/(c_attn|c_proj)/kernel", use_dora=True, use_rslora=True), True),
    "bert+dora": (dict(targets=r".*/attention/self/(query|value)/kernel", use_dora=True), False),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """arch -> (jlora model, params), loaded once from a tiny transformers checkpoint."""
  cache = {}

  def get(arch: str, scan: bool):
    if (arch, scan) not in cache:
      directory = tmp_path_factory.mktemp(f"{arch}_base")
      cache[arch, scan] = models.from_pretrained(save_hf(tiny_hf_model(arch), directory), scan_layers=scan)
    return cache[arch, scan]

  return get


def _random_adapters(model, params, config, seed=0):
  """Random non-zero A and B for every target (numpy, so nothing but the trace is compiled); DoRA's magnitudes
  scattered around their init (the kernels' column norms)."""
  lora = jlora.Lora(model, config)
  shapes = jax.eval_shape(lora.init, jax.random.key(0), params, IDS, MASK)
  adapters = random_like(shapes, seed=seed, scale=0.05)
  if config.use_dora:
    initial = lora.init(jax.random.key(0), params, IDS, MASK)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, a, m: (np.asarray(m) * np.exp(6.0 * a)).astype(np.float32) if path[-1].key == "lora_magnitude"
        else a, adapters, initial)
  return adapters


def _jlora_outputs(model, params, adapters, config):
  lora = jlora.Lora(model, config)
  return np.asarray(jax.jit(lambda p, a: lora.apply(p, a, IDS, MASK))(params, adapters))


def _torch_outputs(arch, torch_model):
  kwargs = {} if arch == "bert" else {"position_ids": position_ids(MASK)}
  return torch_outputs(torch_model, IDS, MASK, **kwargs)


def _close(actual, expected):
  keep = MASK.astype(bool)
  np.testing.assert_allclose(actual[keep], expected[keep], rtol=0, atol=ATOL)


def _peft_config(written: dict) -> peft.LoraConfig:
  """A peft.LoraConfig from the fields we wrote (what a user would pass to get_peft_model)."""
  fields = {k: v for k, v in written.items() if k not in ("peft_type", "auto_mapping", "inference_mode")}
  return peft.LoraConfig(**fields)


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_with_peft_key_names(case, bases, tmp_path):
  kwargs, scan = EXPORT_CASES[case]
  arch = case.split("+")[0]
  model, params = bases(arch, scan)
  config = jlora.LoraConfig(rank=4, alpha=8.0, **kwargs)
  adapters = _random_adapters(model, params, config)
  written = jlora.peft.save_pretrained(tmp_path / "ours", adapters, config, model, params=params,
                                       base_model_name_or_path="tiny/base")
  ours = _jlora_outputs(model, params, adapters, config)

  # PEFT loads the directory onto the transformers model and computes the same outputs.
  peft_model = peft.PeftModel.from_pretrained(tiny_hf_model(arch), tmp_path / "ours").eval()
  _close(_torch_outputs(arch, peft_model), ours)
  base = _torch_outputs(arch, tiny_hf_model(arch))
  assert np.abs(ours - base)[MASK.astype(bool)].max() > 1e-2  # the adapter does something

  # PEFT's own save_pretrained for the same config: same tensor names and shapes, same config fields.
  reference = tiny_hf_model(arch)
  reference.name_or_path = "tiny/base"  # what PEFT records as base_model_name_or_path
  theirs = peft.get_peft_model(reference, _peft_config(written))
  theirs.save_pretrained(tmp_path / "theirs")
  our_tensors = safetensors.numpy.load_file(tmp_path / "ours" / "adapter_model.safetensors")
  their_tensors = safetensors.numpy.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
  assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in their_tensors.items()}
  their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
  for key, value in written.items():
    if key == "target_modules":
      assert set(value) == set(their_config[key])
    else:
      assert their_config[key] == value, key
  assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == written

  # And back: the import reproduces the adapter, its ranks and scales.
  loaded, loaded_config = jlora.peft.from_pretrained(tmp_path / "ours", model, params, IDS, MASK)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, adapters)
  assert loaded_config.use_rslora == config.use_rslora and loaded_config.use_dora == config.use_dora
  for path in jlora.Lora(model, loaded_config).trace(params, IDS, MASK):
    assert loaded_config.rank_for(path) == config.rank_for(path)
    assert loaded_config.scale_for(path, config.rank_for(path)) == config.scale_for(path, config.rank_for(path))


def test_export_scan_and_unrolled_write_the_same_files(bases, tmp_path):
  kwargs, _ = EXPORT_CASES["llama"]
  config = jlora.LoraConfig(rank=4, alpha=8.0, **kwargs)
  stacked = _random_adapters(*bases("llama", True), config)
  unrolled = {"model": {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked["model"]["layers"]) for i in (0, 1)}}
  contents = []
  for scan, adapters in ((True, stacked), (False, unrolled)):
    model, params = bases("llama", scan)
    jlora.peft.save_pretrained(tmp_path / str(scan), adapters, config, model, params=params)
    contents.append(((tmp_path / str(scan) / "adapter_config.json").read_text(),
                     (tmp_path / str(scan) / "adapter_model.safetensors").read_bytes()))
  assert contents[0] == contents[1]  # including the base fingerprint, which ignores the layout


# arch -> (peft.LoraConfig kwargs, scan_layers)
IMPORT_CASES = {
    "llama-scan": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], rank_pattern={"v_proj": 2},
                                 alpha_pattern={"o_proj": 16}, use_rslora=True), True),
    "llama-unrolled": ("llama", dict(target_modules=["q_proj", "k_proj"],
                                     rank_pattern={r"layers\.1\.self_attn\.q_proj": 6}), False),
    "gpt2": ("gpt2", dict(target_modules=r".*\.(c_attn|c_fc)", fan_in_fan_out=True, alpha_pattern={"c_fc": 4}), True),
    "bert": ("bert", dict(target_modules=["query", "value", "dense"], layers_to_transform=[1],
                          exclude_modules=["output.dense"]), False),
    "llama3_rope-tied": ("llama3_rope", dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True), True),
    "llama-scan-dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                                      use_dora=True), True),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True), True),
    "bert-dora": ("bert", dict(target_modules=["query", "value"], use_dora=True), False),
    # An untied embedding: DoRA's magnitude per embedding feature, no dropout on the lookup.
    "llama-embedding-dora": ("llama", dict(target_modules=["embed_tokens", "k_proj"], use_dora=True), False),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_from_peft(case, bases, tmp_path):
  arch, kwargs, scan = IMPORT_CASES[case]
  model, params = bases(arch, scan)
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(tiny_hf_model(arch), peft.LoraConfig(r=4, lora_alpha=8, **kwargs)).eval()
  _train_like(peft_model)
  peft_model.save_pretrained(tmp_path)
  expected = _torch_outputs(arch, peft_model)

  # PEFT's own files store no base fingerprint: loading one is an explicit choice.
  adapters, config = jlora.peft.from_pretrained(tmp_path, model, params, IDS, MASK, policy=ALLOW_NO_FINGERPRINT)
  _close(_jlora_outputs(model, params, adapters, config), expected)
  assert config.use_rslora == kwargs.get("use_rslora", False) and config.use_dora == kwargs.get("use_dora", False)
  assert np.abs(expected - _torch_outputs(arch, tiny_hf_model(arch)))[MASK.astype(bool)].max() > 1e-2


def _train_like(peft_model):
  """Non-zero, trained-looking adapter values: random factors, magnitudes moved away from their init."""
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_magnitude" in name:
        param.mul_(torch.exp(0.3 * torch.randn_like(param)))
      elif "lora_" in name:
        param.copy_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert", "gpt2+dora"])
def test_merged_export_loads_in_transformers(case, bases, tmp_path):
  kwargs, scan = EXPORT_CASES[case]
  arch = case.split("+")[0]
  model, params = bases(arch, scan)
  config = jlora.LoraConfig(rank=4, alpha=8.0, **kwargs)
  adapters = _random_adapters(model, params, config)
  jlora.peft.save_merged(tmp_path, model, params, adapters, config, IDS, MASK)
  auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
  merged = auto.from_pretrained(tmp_path).eval()
  _close(_torch_outputs(arch, merged), _jlora_outputs(model, params, adapters, config))
  assert jlora.verify_manifest(tmp_path, required=True)


# --- refusals ---------------------------------------------------------------------------------------


def test_export_refuses_what_peft_cannot_represent(bases, tmp_path):
  model, params = bases("gpt2", True)
  config = jlora.LoraConfig(targets=r"transformer/wte/embedding", rank=2)
  adapters = _random_adapters(model, params, config)
  with pytest.raises(jlora.JloraError, match="tied to the LM head"):
    jlora.peft.save_pretrained(tmp_path, adapters, config, model)
  with pytest.raises(jlora.JloraError, match="not a target of the given LoraConfig"):
    jlora.peft.save_pretrained(tmp_path, adapters, jlora.LoraConfig(targets=r".*/c_attn/kernel"), model)


def _peft_dir(tmp_path, arch, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.get_peft_model(tiny_hf_model(arch), peft.LoraConfig(r=2, lora_alpha=4, **kwargs))
    peft_model.save_pretrained(tmp_path)
  return tmp_path


def test_import_refusals(bases, tmp_path):
  model, params = bases("llama", True)
  partial = _peft_dir(tmp_path / "partial", "llama", target_modules=["q_proj"], layers_to_transform=[1])
  with pytest.raises(jlora.UnsafeAdapterError, match="PEFT's own save_pretrained writes none.*allow_missing_fingerprint"):
    jlora.peft.from_pretrained(partial, model, params)
  with pytest.raises(jlora.UnsafeAdapterError, match=r"only layers \[1\].*scan_layers=False"):
    jlora.peft.from_pretrained(partial, model, params, policy=ALLOW_NO_FINGERPRINT)
  unrolled, unrolled_params = bases("llama", False)
  _, config = jlora.peft.from_pretrained(partial, unrolled, unrolled_params, policy=ALLOW_NO_FINGERPRINT)
  assert config.targets == [r"model/layers_1/self_attn/q_proj/kernel"]

  tied_dora = _peft_dir(tmp_path / "tied_dora", "llama3_rope", target_modules=["q_proj", "embed_tokens"],
                        use_dora=True, ensure_weight_tying=True)
  tied_model, tied_params = bases("llama3_rope", True)
  with pytest.raises(jlora.UnsafeAdapterError, match="DoRA adapter on the tied embedding"):
    jlora.peft.from_pretrained(tied_dora, tied_model, tied_params, policy=ALLOW_NO_FINGERPRINT)
  dora = _peft_dir(tmp_path / "dora", "llama", target_modules=["q_proj"], use_dora=True)
  (tmp_path / "no_magnitude").mkdir()
  tensors = safetensors.numpy.load_file(dora / "adapter_model.safetensors")
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if "magnitude" not in k},
                              tmp_path / "no_magnitude" / "adapter_model.safetensors", metadata={"format": "pt"})
  (tmp_path / "no_magnitude" / "adapter_config.json").write_bytes((dora / "adapter_config.json").read_bytes())
  with pytest.raises(jlora.UnsafeAdapterError, match="lora_magnitude_vector"):
    jlora.peft.from_pretrained(tmp_path / "no_magnitude", model, params, policy=ALLOW_NO_FINGERPRINT)
  pissa = _peft_dir(tmp_path / "pissa", "llama", target_modules=["q_proj"], init_lora_weights="pissa")
  with pytest.raises(jlora.UnsafeAdapterError, match="rewrites the base weights.*path_initial_model_for_weight_conversion"):
    jlora.peft.from_pretrained(pissa, model, params, policy=ALLOW_NO_FINGERPRINT)

  tied = _peft_dir(tmp_path / "tied", "llama3_rope", target_modules=["embed_tokens"])
  tied_model, tied_params = bases("llama3_rope", True)
  with pytest.raises(jlora.UnsafeAdapterError, match="for the lookup only"):
    jlora.peft.from_pretrained(tied, tied_model, tied_params)

  plain = _peft_dir(tmp_path / "plain", "llama", target_modules=["q_proj"])
  with pytest.raises(jlora.UnsafeAdapterError, match="base_model_name_or_path"):
    jlora.peft.from_pretrained(plain, model, params, expected_base_model="meta-llama/Llama-3.2-1B")
  with pytest.raises(jlora.UnsafeAdapterError, match="stores base fingerprint None"):
    jlora.peft.from_pretrained(plain, model, params, expected_fingerprint="sha256:00", policy=ALLOW_NO_FINGERPRINT)


def test_import_checks_the_stored_base_fingerprint(bases, tmp_path):
  model, params = bases("gpt2", True)
  config = jlora.LoraConfig(targets=r".*/c_attn/kernel", rank=2)
  adapters = _random_adapters(model, params, config)
  jlora.peft.save_pretrained(tmp_path, adapters, config, model, params=params)
  other = jax.tree.map(lambda x: x * 1.5, params)
  with pytest.raises(jlora.UnsafeAdapterError, match="different base model"):
    jlora.peft.from_pretrained(tmp_path, model, other)
  fp = jlora.peft.base_fingerprint(model, params)
  jlora.peft.from_pretrained(tmp_path, model, params, expected_fingerprint=fp)


def test_base_fingerprint_ignores_float32_or_bfloat16_params(bases, tmp_path):
  """README: the stored fingerprint is independent of float32/bfloat16 params (and of scan_layers)."""
  model, params = bases("llama", True)
  fp = jlora.peft.base_fingerprint(model, params)
  as_bf16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
  assert jlora.peft.base_fingerprint(model, as_bf16) == fp
  unrolled, unrolled_params = bases("llama", False)
  unrolled_bf16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), unrolled_params)
  assert jlora.peft.base_fingerprint(unrolled, unrolled_bf16) == fp
  # Loaded in bfloat16 from the float32 checkpoint, as a user serving the base in bf16 would.
  directory = save_hf(tiny_hf_model("llama"), tmp_path / "base")
  bf16_model, loaded = models.from_pretrained(directory, param_dtype=jax.numpy.bfloat16)
  assert loaded["model"]["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
  assert jlora.peft.base_fingerprint(bf16_model, loaded) == fp
  # Not blind to values: one weight moved by more than bf16's resolution changes it.
  moved = jax.tree.map(lambda x: x, params)
  moved["model"]["norm"]["scale"] = params["model"]["norm"]["scale"] * 1.05
  assert jlora.peft.base_fingerprint(model, moved) != fp


# --- PiSSA / OLoRA: trained on a residual base, exchanged as plain LoRA on the original base ---------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_export_applies_to_the_original_base(init, bases, tmp_path):
  """jlora trains PiSSA/OLoRA on the residual; the export is the rank-2r LoRA that PEFT applies to the original
  transformers model with the same logits."""
  model, params = bases("llama", True)
  config = jlora.LoraConfig(targets=r".*/(q_proj|down_proj)/kernel", rank=4, alpha=8.0, init=init,
                            rank_pattern={r".*/down_proj/kernel": 2})
  lora = jlora.Lora(model, config)
  residual, initial = lora.init_with_base(jax.random.key(0), params, IDS, MASK)
  trained = jax.tree.map(lambda v, n: v + n, initial, random_like(initial, seed=1, scale=0.02))
  ours = _jlora_outputs(model, residual, trained, config)
  with pytest.raises(jlora.JloraError, match="pass initial_adapters="):
    jlora.peft.save_pretrained(tmp_path / "unconverted", trained, config, model, params=params)
  written = jlora.peft.save_pretrained(tmp_path / "ours", trained, config, model, params=params,
                                       initial_adapters=initial)
  assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
  assert written["rank_pattern"] == {"down_proj": 4}

  peft_model = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), tmp_path / "ours").eval()
  _close(_torch_outputs("llama", peft_model), ours)
  assert np.abs(ours - _torch_outputs("llama", tiny_hf_model("llama")))[MASK.astype(bool)].max() > 1e-2
  adapters, loaded = jlora.peft.from_pretrained(tmp_path / "ours", model, params, IDS, MASK)
  _close(_jlora_outputs(model, params, adapters, loaded), ours)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_peft_pissa_converted_loads_onto_the_original_base(init, bases, tmp_path):
  """A PEFT PiSSA/OLoRA adapter saved with path_initial_model_for_weight_conversion is a plain LoRA on the original
  base: jlora loads it there and computes what PEFT's trained model (residual base + adapter) computes."""
  model, params = bases("llama", True)
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.get_peft_model(tiny_hf_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)).eval()
    peft_model.peft_config["default"].init_lora_weights = True  # as PEFT's docs: the saved start is the init
    peft_model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
      for name, param in peft_model.named_parameters():
        if "lora_" in name:
          param.add_(0.02 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=tmp_path / "initial")
  expected = _torch_outputs("llama", peft_model)
  adapters, config = jlora.peft.from_pretrained(tmp_path / "final", model, params, IDS, MASK,
                                                policy=ALLOW_NO_FINGERPRINT)
  assert config.rank == 8 and config.init == "kaiming_uniform"
  _close(_jlora_outputs(model, params, adapters, config), expected)
