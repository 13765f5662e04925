"""What the training loop needs from a task: frozen params, a trainable init, a loss and an eval."""

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

import jlora
from jlora import models, quant, sharding
from train import data


@dataclasses.dataclass
class Task:
  """A fine-tuning task, built from the config by ``train.tasks.build``.

  Attributes:
    lora: the LoRA transform of the base model (its config, ``train.variants.lora_config``, is exported with the
      adapter).
    params: the frozen base params.
    init: ``(key, params) -> (params', {"lora": adapters, ...})``: ``Lora.init_with_base``'s base (``params`` itself
      unless the variant rewrites it: PiSSA/OLoRA's residual, VeRA's projections) and the trainable tree; other
      entries than ``"lora"`` (a task head) train too.
    loss: ``(trainable, params, batch, rng) -> (loss_sum, {"weight": n})`` over one micro-batch.
    eval_sums: ``(trainable, params, batch) -> {"loss_sum", "weight", ...}`` summed over a batch.
    summarize_eval: sums over the eval set -> ``{"eval/loss": ..., "eval/accuracy" | "eval/perplexity": ...}``.
    train_batches: a fresh, resumable (``get_state``/``set_state``) iterator of micro-batches.
    eval_batches: a fresh finite iterable of eval batches.
    count_tokens: real (non-padding) tokens in a host batch, for tokens/s.
    metadata: JSON-serialisable facts stored with the exported adapter.
    generation_eval: optional ``(trainable, params, step) -> {"eval/...": value}``, run before training and
      after the last step (it decodes, so it is too slow for every eval); its metrics join that step's eval.
    export_extra: optional ``(directory, params, adapters, lora_config)``, writing more files (another adapter
      format) into the adapter export directory before the adapter itself, so its manifest covers them; given the
      adapter as exported and the base it applies to (``train.variants.exported``).
  """

  lora: jlora.Lora
  params: Any
  init: Callable[[jax.Array, Any], tuple[Any, dict]]
  loss: Callable
  eval_sums: Callable
  summarize_eval: Callable[[Mapping[str, float]], dict]
  train_batches: Callable[[], Any]
  eval_batches: Callable[[], Iterable[dict]]
  count_tokens: Callable[[dict], int]
  metadata: dict
  generation_eval: Callable[[dict, Any, int], dict] | None = None
  export_extra: Callable[[str, Any, Any, jlora.LoraConfig], None] | None = None


def sharding_rules(path: str, config: ml_collections.ConfigDict) -> sharding.Rules:
  """``config.mesh.rules`` first, then the default rules of the checkpoint's architecture."""
  if path.lower().endswith(".gguf"):  # the config.json that the file's metadata stands for
    from jlora.models._gguf import hf_config_from_gguf, open_gguf  # no public name yet; from_pretrained uses it

    hf_config = hf_config_from_gguf(open_gguf(path))
  else:
    with open(os.path.join(path, "config.json")) as f:
      hf_config = json.load(f)
  model = models.model_for_config(models.config_from_hf(hf_config))
  return sharding.rules_from_config(config.mesh.rules, sharding.rules_for(model))


QUANTIZE_KINDS = ("", "nf4", "fp4", "int8", "gguf")


def load_base(path: str, config: ml_collections.ConfigDict, mesh: Mesh, **kwargs):
  """The frozen base, loaded straight into its shards on ``mesh`` (no host holds whole sharded tensors).

  ``config.model.quantize`` makes it QLoRA's base: ``"gguf"`` keeps a GGUF file's Q4_0 / Q4_1 / Q8_0
  projections in their blocks (``from_pretrained(..., quantized="keep")``, never a float copy);
  ``"nf4"`` / ``"fp4"`` / ``"int8"`` quantize the kernels ``model.quantize_targets`` selects after loading
  (:func:`quantize_base`). Either way each quantized leaf is sharded by ``jlora.sharding.param_specs``.
  """
  kind = config.model.get("quantize", "")
  if kind not in QUANTIZE_KINDS:
    raise ValueError(f"model.quantize must be one of {list(QUANTIZE_KINDS)} ('' = no quantization), got {kind!r}.")
  if kind == "gguf":
    if not path.lower().endswith(".gguf"):
      raise ValueError(f"model.quantize='gguf' keeps the blocks of a GGUF file, but the checkpoint is {path}; use "
                       "model.quantize='nf4' (or fp4, int8) to quantize a float checkpoint.")
    kwargs["quantized"] = "keep"
  rules = sharding_rules(path, config)
  model, params = models.from_pretrained(path, dtype=jnp.dtype(config.model.dtype),
                                         param_dtype=jnp.dtype(config.model.param_dtype), mesh=mesh, rules=rules,
                                         **kwargs)
  if kind in ("nf4", "fp4", "int8"):
    params = quantize_base(params, config.model, mesh, rules)
  return model, params


def quantization_metadata(config: ml_collections.ConfigDict) -> dict | None:
  """How the job quantized its frozen base (stored with the exported adapter), or None for a float base.

  An adapter trained over a quantized base is checked against that base's fingerprint; these settings
  rebuild it from the checkpoint (``jlora.quant.quantize(params, targets, kind, block_size, double_quant)``, or
  ``from_pretrained(path, quantized="keep")`` for ``"gguf"``).
  """
  kind = config.model.get("quantize", "")
  if not kind:
    return None
  if kind == "gguf":
    return {"kind": "gguf"}
  return {"kind": kind, "targets": config.model.quantize_targets, "block_size": config.model.block_size,
          "double_quant": config.model.double_quant}


def quantize_base(params: Any, model_config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules) -> Any:
  """``params`` with the kernels ``model_config.quantize_targets`` selects in ``model_config.quantize``'s format
  (``jlora.quant.quantize``), each quantized leaf placed by ``jlora.sharding.param_specs``.

  Raises:
    JloraError: a target that matches nothing or no kernel, non-finite weights, or a mesh that would split a
      block (every device holds whole blocks: lower ``model.block_size`` or split the input axis less).
  """
  quantized = quant.quantize(params, model_config.quantize_targets, kind=model_config.quantize,
                             block_size=model_config.block_size, double_quant=model_config.double_quant)
  return jax.device_put(quantized, sharding.named(sharding.param_specs(quantized, rules, mesh), mesh))


def registered_sources(config: ml_collections.ConfigDict) -> dict | None:
  """``{"train", "validation"}`` sources of the registered TFDS dataset ``config.data.tfds.name``, or None."""
  tfds_config = config.data.tfds
  if not tfds_config.name:
    return None
  data_dir = tfds_config.data_dir or None
  return {"train": data.data_source(tfds_config.name, tfds_config.train_split, data_dir=data_dir),
          "validation": data.data_source(tfds_config.name, tfds_config.eval_split, data_dir=data_dir)}


def write_splits(directory: str, lines: dict[str, list[str]]) -> dict[str, str]:
  """Writes ``{split}.jsonl`` files into ``directory`` (created if needed); returns ``{split: path}``.

  Each file is written next to its path and renamed into place, so a reader (another process of a multi-host job
  writing the same files, or TFDS checking them) sees a previous complete file or the new one, never a partial one.
  """
  os.makedirs(directory, exist_ok=True)
  paths = {split: os.path.join(directory, f"{split}.jsonl") for split in lines}
  for split, path in paths.items():
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as f:
      f.writelines(lines[split])
    os.replace(partial, path)
  return paths
