"""The SmolLM2 SFT job (configs/smollm2_sft.py) end to end on its smoke variant: a tiny random model with SmolLM2's
tokenizer and chat template, the standard-library summary task, the generation eval and both adapter formats."""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

import jlora
import jlora.peft
from jlora import models
from train import train as train_lib
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  from configs import smollm2_sft

  config = smollm2_sft.get_config("smoke")
  config.mesh.num_devices = 1  # the test session has 8 fake devices; the smoke batch is for one
  workdir = str(tmp_path_factory.mktemp("smollm2_smoke"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, result, printed.getvalue()


def test_smoke_trains_and_evaluates_generation_before_and_after(smoke_run):
  workdir, config, result, _ = smoke_run
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"] - 0.05
  steps = config.train.steps
  rows = read_metrics(workdir)
  generation_rows = [r["step"] for r in rows if "eval/rouge_l" in r and "eval/exact_match" in r]
  assert generation_rows == [0, steps]  # decoding only before training and after the last step
  assert [r["step"] for r in rows if "eval/loss" in r] == [0, config.train.eval_every, steps]
  for step in (0, steps):
    with open(os.path.join(workdir, "generations", f"step_{step}.jsonl")) as f:
      answers = [json.loads(line) for line in f]
    assert len(answers) == config.generation_eval.num_prompts
    logged = next(r for r in rows if r["step"] == step and "eval/rouge_l" in r)
    assert logged["eval/rouge_l"] == pytest.approx(np.mean([a["rouge_l"] for a in answers]))
    assert all(a["reference"] and a["label"] for a in answers)
  for name in ("curves.png", "tensorboard", "checkpoints", "config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name


def test_smoke_prints_answers_before_and_after(smoke_run):
  workdir, config, _, printed = smoke_run
  answers = {}
  for step in (0, config.train.steps):
    assert f"generation eval at step {step}: {config.generation_eval.num_prompts} held-out prompts" in printed
    with open(os.path.join(workdir, "generations", f"step_{step}.jsonl")) as f:
      answers[step] = [json.loads(line) for line in f]
  for i in range(config.generation_eval.shown):
    before, after = answers[0][i], answers[config.train.steps][i]
    block = (f"[{i + 1}] {before['label']}\n    reference: {before['reference']}\n    before:    "
             f"{' '.join(before['answer'].split())}\n    after:     {' '.join(after['answer'].split())}\n")
    assert block in printed


def test_smoke_exports_jlora_and_peft_adapters_that_agree(smoke_run):
  workdir, _, result, _ = smoke_run
  adapter = result["adapter"]
  base = os.path.join(workdir, "tiny_model.gguf")
  model, params = models.from_pretrained(base)
  metadata = jlora.load_adapter_metadata(adapter)
  assert metadata["extra"]["base_model"] == os.path.abspath(base)
  lora = jlora.Lora(model, metadata["lora_config"])
  tokens = np.zeros((1, 1), np.int32)
  ours, _ = jlora.load_adapters(adapter, jax.eval_shape(lora.init, jax.random.key(0), params, tokens), params=params,
                                lora=lora)
  with open(os.path.join(adapter, "peft", "adapter_config.json")) as f:
    peft_config = json.load(f)
  assert peft_config["base_model_name_or_path"] == os.path.abspath(base)
  assert set(peft_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
  theirs, _ = jlora.peft.from_pretrained(os.path.join(adapter, "peft"), model, params)
  jax.tree.map(np.testing.assert_array_equal, theirs, ours)
  manifest = jlora.verify_manifest(adapter, required=True)  # the PEFT copy is inside the adapter's manifest
  assert {"peft/adapter_config.json", "peft/adapter_model.safetensors"} <= set(manifest)
