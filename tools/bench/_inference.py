"""Inference contenders: the base forward, the unmerged-LoRA forward, the merged forward, and KV-cache decoding.

* base: ``model.apply({"params": params}, ids)``;
* unmerged: ``lora.apply(params, adapters, ids)`` (base plus the low-rank path in every projection);
* merged: the *base program* run on ``lora.merge(params, adapters)``: merging yields plain params, so
  serving a merged adapter is exactly a base forward;
* decoding: ``jlora.models.generate`` with the base params, and with ``lora.inject(params, adapters)``
  as params and ``apply_fn=lora.apply_fn()`` (the injected form, compiled once for any adapter value).
"""

from collections.abc import Callable

import jax

from jlora import models
from tools.bench._models import LinenSetup, with_trained_b
from tools.bench._timing import CompiledStep, compile_step


def forward_contenders(setup: LinenSetup) -> tuple[dict[str, Callable[[], jax.Array]], dict[str, CompiledStep]]:
  """Zero-argument callables for the base, unmerged and merged forwards, and their compilations.

  The adapters get random non-zero ``B`` first, as after training.

  Returns:
    ``({"base", "unmerged", "merged", "base_again"}: callables, {"base", "unmerged"}: CompiledStep)``;
    ``base_again`` is the base forward timed as a second contender: base_again/base is the timing
    noise floor of the run (an A/A comparison), against which merged/base is read.
  """
  model, lora, params, ids = setup.model, setup.lora, setup.params, setup.ids
  adapters = with_trained_b(setup.adapters)
  base = compile_step(lambda p, x: model.apply({"params": p}, x), params, ids)
  unmerged = compile_step(lambda p, a, x: lora.apply(p, a, x), params, adapters, ids)
  merged_params = jax.block_until_ready(lora.merge(params, adapters))
  runs = {
      "base": lambda: base.executable(params, ids),
      "unmerged": lambda: unmerged.executable(params, adapters, ids),
      "merged": lambda: base.executable(merged_params, ids),
      "base_again": lambda: base.executable(params, ids),
  }
  return runs, {"base": base, "unmerged": unmerged}


def decode_contenders(setup: LinenSetup, prompt_ids: jax.Array, new_tokens: int) -> dict[str, Callable[[], jax.Array]]:
  """Greedy ``generate`` of ``new_tokens`` tokens after ``prompt_ids``, without and with adapters.

  The first call of each compiles (``generate`` is jitted on the model and ``apply_fn``); time them
  after a warm-up.

  Returns:
    ``{"base": ..., "lora": ...}``, each returning the generated ids.
  """
  model, lora = setup.model, setup.lora
  injected = lora.inject(setup.params, with_trained_b(setup.adapters))
  apply_fn = lora.apply_fn()
  return {
      "base": lambda: models.generate(model, setup.params, prompt_ids, max_new_tokens=new_tokens),
      "lora": lambda: models.generate(model, injected, prompt_ids, max_new_tokens=new_tokens, apply_fn=apply_fn),
  }
