"""Shared by test_bank and test_alora: one tiny transformers Llama and three PEFT adapters on it, built once.

* ``base()``: ``(hf_model, jlora model, params)`` of the tiny Llama (layers stacked with ``nn.scan``).
* ``peft_adapters()``: a ``PeftModelForCausalLM`` holding adapters ``a`` (LoRA on q/v, rank 4), ``b`` (rsLoRA on
  o/down, ranks 2 and 3) and ``c`` (activated LoRA on q/k/up, invocation ``INVOCATION``), with random non-zero
  factors, and the directory where PEFT saved them (one subdirectory each).
* ``batch()``: five rows of token ids with left padding in row 1 and the invocation planted in rows 3 and 4
  (twice in row 4, so the last occurrence counts).
"""

import functools
import tempfile
import warnings

import numpy as np
from test_models_references import position_ids, save_hf, tiny_hf_model

import jlora
from jlora import models

INVOCATION = [17, 23]
# Genuine PEFT files store no base fingerprint; loading them is an explicit choice.
ALLOW_NO_FINGERPRINT = jlora.LoadPolicy(allow_missing_fingerprint=True)
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)/kernel"
# The checkpoint and PEFT files below, shared by the test modules of one process; removed when it exits.
_FILES = tempfile.TemporaryDirectory(prefix="jlora-multi-adapter-")


@functools.cache
def base():
  hf = tiny_hf_model("llama")
  directory = tempfile.mkdtemp(prefix="base-", dir=_FILES.name)
  model, params = models.from_pretrained(save_hf(hf, directory), scan_layers=True)
  return hf, model, params


@functools.cache
def peft_adapters():
  import peft
  import torch

  configs = {
      "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
      "b": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["o_proj", "down_proj"], rank_pattern={"down_proj": 3},
                           use_rslora=True, task_type="CAUSAL_LM"),
      "c": peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "up_proj"],
                           alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM"),
  }
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_model = peft.get_peft_model(tiny_hf_model("llama"), configs["a"], adapter_name="a")
    for name in ("b", "c"):
      peft_model.add_adapter(name, configs[name])
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_" in name:
        param.copy_(0.05 * torch.randn_like(param))
  peft_model.eval()
  directory = tempfile.mkdtemp(prefix="peft-", dir=_FILES.name)
  peft_model.save_pretrained(directory, selected_adapters=list(configs))
  return peft_model, {name: f"{directory}/{name}" for name in configs}


def batch() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 128, size=(5, 9)).astype(np.int32)
  ids[ids == INVOCATION[0]] = 5  # the invocation occurs only where it is planted
  mask = np.ones_like(ids)
  mask[1, :2], ids[1, :2] = 0, 0
  ids[3, 4:6] = INVOCATION
  ids[4, 1:3] = INVOCATION
  ids[4, 6:8] = INVOCATION
  return ids, mask


def peft_logits(peft_model, ids: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
  """PEFT's logits for a left-padded batch (transformers' positions: ``cumsum(mask) - 1``)."""
  import torch

  with torch.no_grad():
    out = peft_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     position_ids=torch.from_numpy(position_ids(mask).astype(np.int64)), **kwargs)
  return out.logits.float().numpy()
