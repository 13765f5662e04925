"""The training job over a quantized frozen base (``config.model.quantize``): QLoRA end to end.

Two jobs: the Llama SFT smoke over NF4 kernels quantized after loading, and the SmolLM2 smoke over a GGUF
file's own Q4_1 blocks. Each exported adapter must name the quantized base (its fingerprint is that of
``jlora.quant.quantize`` of the checkpoint, or of ``from_pretrained(..., quantized="keep")``), load onto that
base and be refused on the float weights; the PEFT copy likewise; a resumed QLoRA job ends where an uninterrupted
one does, and a checkpoint never resumes over another base.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jlora
import jlora.peft
from jlora import models, quant
from train import train as train_lib
from train.tasks import pydoc_sft

PROJECTIONS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return pydoc_sft.create_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


def _llama_config(checkpoint, **overrides):
  """The job of tests/test_train_sharded.py (so the two share compiled programs) over an NF4 base."""
  from configs import llama_sft

  config = llama_sft.get_config("smoke")
  config.model.path = checkpoint
  config.model.quantize = "nf4"
  config.model.block_size = 32  # the 2-process run splits the 64-wide input axis in two: whole blocks of 32
  config.data.batch_size = 16
  config.data.eval_batch_size = 8
  config.train.steps = 8
  config.train.eval_every = 8
  config.checkpoint.every = 4
  config.checkpoint.use_async = False
  config.mesh.num_devices = 1
  config.update_from_flattened_dict(overrides)
  return config


def _saved_adapters(workdir):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(workdir, "adapter", "adapters"))


@pytest.fixture(scope="module")
def nf4_run(checkpoint, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("nf4"))
  return workdir, train_lib.train_and_evaluate(_llama_config(checkpoint), workdir)


def _float_and_nf4(checkpoint):
  model, params = models.from_pretrained(checkpoint)
  return model, params, quant.quantize(params, PROJECTIONS, kind="nf4", block_size=32)


def test_nf4_job_trains_over_the_quantized_base_and_exports_against_it(nf4_run, checkpoint):
  workdir, result = nf4_run
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"]
  model, params, qparams = _float_and_nf4(checkpoint)
  metadata = jlora.load_adapter_metadata(result["adapter"])
  assert metadata["extra"]["base_quantization"] == {"kind": "nf4", "targets": PROJECTIONS, "block_size": 32,
                                                    "double_quant": True}
  # The job quantized exactly these kernels in this format: the adapter names that base, not the float one.
  assert metadata["base_fingerprint"] == jlora.fingerprint(qparams) != jlora.fingerprint(params)
  lora = jlora.Lora(model, metadata["lora_config"])
  ids = jnp.zeros((1, 8), jnp.int32)
  target = jax.eval_shape(lora.init, jax.random.key(0), qparams, ids)
  adapters, _ = jlora.load_adapters(result["adapter"], target, params=qparams, lora=lora)
  jax.tree.map(np.testing.assert_array_equal, adapters, _saved_adapters(workdir))
  with pytest.raises(jlora.UnsafeAdapterError, match="fingerprint"):
    jlora.load_adapters(result["adapter"], target, params=params)


def test_nf4_job_reports_its_compiled_step_memory(nf4_run, checkpoint):
  workdir, _ = nf4_run
  with open(os.path.join(workdir, "train_step_memory.json")) as f:
    figures = json.load(f)
  _, _, qparams = _float_and_nf4(checkpoint)
  footprint = quant.footprint(qparams)
  assert figures["quantized_params"] == footprint.quantized_params
  assert figures["bytes_per_quantized_param"] == pytest.approx(footprint.bytes_per_param)
  assert figures["base_bytes"] == footprint.total_bytes
  # The frozen base is an argument of the step: its codes and statistics, never a float copy.
  assert figures["argument_bytes"] >= footprint.total_bytes
  assert figures["peak_bytes"] == (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"]
                                   + figures["temp_bytes"])


def _rewind_to_step_4(source, destination):
  shutil.copytree(source, destination)
  shutil.rmtree(os.path.join(destination, "checkpoints", "8"))
  shutil.rmtree(os.path.join(destination, "adapter"))


def test_nf4_job_resumes_to_the_uninterrupted_adapters(nf4_run, checkpoint, tmp_path):
  source, _ = nf4_run
  workdir = str(tmp_path / "resumed")
  _rewind_to_step_4(source, workdir)
  result = train_lib.train_and_evaluate(_llama_config(checkpoint), workdir)
  assert result["before"] is None and result["steps"] == 8
  jax.tree.map(np.testing.assert_array_equal, _saved_adapters(workdir), _saved_adapters(source))


@pytest.mark.parametrize("overrides", [{"model.quantize": ""}, {"model.quantize": "fp4"}, {"model.block_size": 64}])
def test_a_checkpoint_never_resumes_over_another_base(nf4_run, checkpoint, tmp_path, overrides):
  source, _ = nf4_run
  workdir = str(tmp_path / "other_base")
  _rewind_to_step_4(source, workdir)
  with pytest.raises(train_lib.WorkdirStateError, match="another frozen base"):
    train_lib.train_and_evaluate(_llama_config(checkpoint, **overrides), workdir)


def test_bad_quantize_settings_fail_before_training(checkpoint, tmp_path):
  with pytest.raises(ValueError, match="model.quantize must be one of"):
    train_lib.train_and_evaluate(_llama_config(checkpoint, **{"model.quantize": "nf3"}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="keeps the blocks of a GGUF file"):
    train_lib.train_and_evaluate(_llama_config(checkpoint, **{"model.quantize": "gguf"}), str(tmp_path / "b"))


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
  from configs import smollm2_sft

  config = smollm2_sft.get_config("smoke_qlora")  # the file's Q4_1 blocks kept, as configs/smollm2_sft.py:qlora
  config.mesh.num_devices = 1
  config.train.steps = 4
  config.train.eval_every = 4
  workdir = str(tmp_path_factory.mktemp("gguf"))
  result = train_lib.train_and_evaluate(config, workdir)
  return workdir, result, os.path.join(workdir, "tiny_model.q4_1.gguf")


def test_gguf_job_trains_over_the_files_blocks_and_both_exports_name_them(gguf_run):
  workdir, result, path = gguf_run
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"]
  assert "eval/rouge_l" in result["after"]  # the generation eval decodes over the kept blocks too
  model, kept = models.from_pretrained(path, quantized="keep")
  _, dequantized = models.from_pretrained(path)
  assert {type(leaf).__name__ for leaf in jax.tree.leaves(kept, is_leaf=quant.is_quantized)} >= {"GgufBlocks"}
  metadata = jlora.load_adapter_metadata(result["adapter"])
  assert metadata["extra"]["base_quantization"] == {"kind": "gguf"}
  assert metadata["base_fingerprint"] == jlora.fingerprint(kept) != jlora.fingerprint(dequantized)
  with open(os.path.join(workdir, "train_step_memory.json")) as f:
    assert json.load(f)["bytes_per_quantized_param"] == 0.625  # Q4_1: 32 codes, a float16 scale and minimum

  # The PEFT copy (exported with params= the kept blocks) carries the PEFT fingerprint of that base.
  peft_dir = os.path.join(result["adapter"], "peft")
  ids = jnp.zeros((1, 1), jnp.int32)
  adapters, config = jlora.peft.from_pretrained(peft_dir, model, kept, ids)
  ours = _saved_adapters(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), adapters, ours)
  with pytest.raises(jlora.UnsafeAdapterError, match="fingerprint"):
    jlora.peft.from_pretrained(peft_dir, model, dequantized, ids)


def test_qlora_variant_of_the_main_job_changes_only_the_base():
  """configs/smollm2_sft.py:qlora is the main job over the kept Q4_1 blocks: same steps, data, adapter, optimizer."""
  from configs import smollm2_sft

  def flat(tree, prefix=""):
    if not isinstance(tree, dict):
      return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in flat(sub, f"{prefix}.{name}").items()}

  plain, qlora = flat(smollm2_sft.get_config().to_dict()), flat(smollm2_sft.get_config("qlora").to_dict())
  assert plain.keys() == qlora.keys()
  assert {k for k in plain if plain[k] != qlora[k]} == {".model.quantize", ".model.tiny_projection_type"}
  assert qlora[".model.quantize"] == "gguf" and not plain[".model.quantize"]
  with pytest.raises(ValueError, match="unknown variant"):
    smollm2_sft.get_config("qlora_nf4")


# --- jlora.peft.base_fingerprint of a quantized base ----------------------------------------------------------


def _tiny_llama(scan_layers: bool):
  config = models.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, scan_layers=scan_layers)
  return models.LlamaForCausalLM(config)


def _unroll(params, layers: int):
  inner = dict(params["model"])
  stacked = inner.pop("layers")
  inner.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(layers)})
  return {**params, "model": inner}


def test_peft_fingerprint_of_a_quantized_base_is_what_it_stores():
  scanned = _tiny_llama(scan_layers=True)
  unrolled = _tiny_llama(scan_layers=False)
  params = scanned.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  flat = _unroll(params, 2)
  nf4 = jlora.peft.base_fingerprint(scanned, quant.quantize(params, PROJECTIONS))
  # Stacked layers are quantized one matrix per layer, so the unrolled base quantizes to the same layers.
  assert jlora.peft.base_fingerprint(unrolled, quant.quantize(flat, PROJECTIONS)) == nf4
  others = {
      "float": jlora.peft.base_fingerprint(scanned, params),
      "dequantized": jlora.peft.base_fingerprint(scanned, quant.dequantize(quant.quantize(params, PROJECTIONS))),
      "fp4": jlora.peft.base_fingerprint(scanned, quant.quantize(params, PROJECTIONS, kind="fp4")),
      "blocks of 32": jlora.peft.base_fingerprint(scanned, quant.quantize(params, PROJECTIONS, block_size=32)),
      "nf4, no double quantization": jlora.peft.base_fingerprint(
          scanned, quant.quantize(params, PROJECTIONS, double_quant=False)),
  }
  assert nf4 not in others.values() and len(set(others.values())) == len(others), others
  # One changed code of one layer changes it.
  q = quant.quantize(params, PROJECTIONS)
  kernel = q["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  changed = dataclasses.replace(kernel, codes=kernel.codes.at[1, 0, 0].add(1))
  q["model"]["layers"]["self_attn"]["q_proj"]["kernel"] = changed
  assert jlora.peft.base_fingerprint(scanned, q) != nf4


def test_peft_fingerprint_of_gguf_blocks_ignores_the_dtype_they_dequantize_to(gguf_run):
  _, _, path = gguf_run
  model, kept = models.from_pretrained(path, quantized="keep")
  bf16_model, kept_bf16 = models.from_pretrained(path, quantized="keep", param_dtype=jnp.bfloat16)
  assert jlora.peft.base_fingerprint(model, kept) == jlora.peft.base_fingerprint(bf16_model, kept_bf16)
