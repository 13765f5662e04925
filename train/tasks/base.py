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
from jlora import models, sharding
from train import data


@dataclasses.dataclass
class Task:
  """A fine-tuning task, built from the config by ``train.tasks.build``.

  Attributes:
    lora: the LoRA transform of the base model (its config is exported with the adapter).
    params: the frozen base params.
    init_trainable: ``key -> {"lora": adapters, ...}``; other entries (a task head) train too.
    loss: ``(trainable, params, batch, rng) -> (loss_sum, {"weight": n})`` over one micro-batch.
    eval_sums: ``(trainable, params, batch) -> {"loss_sum", "weight", ...}`` summed over a batch.
    summarize_eval: sums over the eval set -> ``{"eval/loss": ..., "eval/accuracy" | "eval/perplexity": ...}``.
    train_batches: a fresh, resumable (``get_state``/``set_state``) iterator of micro-batches.
    eval_batches: a fresh finite iterable of eval batches.
    count_tokens: real (non-padding) tokens in a host batch, for tokens/s.
    metadata: JSON-serialisable facts stored with the exported adapter.
    generation_eval: optional ``(trainable, params, step) -> {"eval/...": value}``, run before training and
      after the last step (it decodes, so it is too slow for every eval); its metrics join that step's eval.
    export_extra: optional ``(directory, params, trainable)``, writing more files (another adapter format)
      into the adapter export directory before the adapter itself, so its manifest covers them.
  """

  lora: jlora.Lora
  params: Any
  init_trainable: Callable[[jax.Array], dict]
  loss: Callable
  eval_sums: Callable
  summarize_eval: Callable[[Mapping[str, float]], dict]
  train_batches: Callable[[], Any]
  eval_batches: Callable[[], Iterable[dict]]
  count_tokens: Callable[[dict], int]
  metadata: dict
  generation_eval: Callable[[dict, Any, int], dict] | None = None
  export_extra: Callable[[str, Any, dict], None] | None = None


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


def load_base(path: str, config: ml_collections.ConfigDict, mesh: Mesh, **kwargs):
  """The frozen base, loaded straight into its shards on ``mesh`` (no host holds whole sharded tensors)."""
  return models.from_pretrained(path, dtype=jnp.dtype(config.model.dtype),
                                param_dtype=jnp.dtype(config.model.param_dtype), mesh=mesh,
                                rules=sharding_rules(path, config), **kwargs)


def registered_sources(config: ml_collections.ConfigDict) -> dict | None:
  """``{"train", "validation"}`` sources of the registered TFDS dataset ``config.data.tfds.name``, or None."""
  tfds_config = config.data.tfds
  if not tfds_config.name:
    return None
  data_dir = tfds_config.data_dir or None
  return {"train": data.data_source(tfds_config.name, tfds_config.train_split, data_dir=data_dir),
          "validation": data.data_source(tfds_config.name, tfds_config.eval_split, data_dir=data_dir)}
