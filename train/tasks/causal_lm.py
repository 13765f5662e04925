"""Causal-LM supervised fine-tuning of a Llama-family checkpoint: LoRA, packed sequences, masked loss.

Rows pack several examples (``segment_ids`` keep attention block-diagonal, ``positions`` restart per
example); the loss counts only trained tokens (assistant/completion), via ``loss_mask``.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import jlora
from jlora import models
from train import data
from train.tasks import pydoc_sft
from train.tasks.base import Task, load_base, registered_sources


def _checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.model.path:
    return config.model.path
  if config.model.create_tiny:
    return pydoc_sft.create_tiny_llama(os.path.join(workdir, "tiny_llama"), seed=config.seed)
  raise ValueError("Set --config.model.path to a Hugging Face Llama-family checkpoint directory "
                   "(or model.create_tiny=True for a local smoke test).")


def _sources(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``{"train", "validation"}`` data sources: a registered TFDS dataset by name, or local JSONL built to TFDS."""
  registered = registered_sources(config)
  if registered is not None:
    return registered
  source = config.data.source
  paths = pydoc_sft.write_jsonl(os.path.join(workdir, "data", "raw")) if source == "pydoc_sft" else dict(source)
  builder = data.build_jsonl_instructions(paths, os.path.join(workdir, "data", "tfds"), name=config.data.name,
                                          on_bad_example=config.data.on_bad_example)
  return {split: data.data_source(builder, split) for split in ("train", "validation")}


def build(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  path = _checkpoint(config, workdir)
  model, params = load_base(path, config, mesh, scan_layers=config.model.scan_layers, remat=config.model.remat)
  tokenizer = models.load_tokenizer(path)
  tokenizer.no_truncation()
  tokenizer.no_padding()
  sources = _sources(config, workdir)
  text_field = config.data.tfds.text_field
  turns_fn = None if text_field == "text" else (lambda record: [("text", record[text_field].decode())])
  template = data.default_template(config.data.end_token, config.data.bos_token or None)
  seq_len, micro_batch = config.data.seq_len, config.data.batch_size // config.train.accum_steps

  def batches(split: str, batch_size: int, shuffle: bool, num_epochs):
    return data.lm_batches(sources[split], tokenizer, seq_len=seq_len, batch_size=batch_size,
                           template=template, seed=config.seed, shuffle=shuffle, num_epochs=num_epochs,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           on_bad_example=config.data.on_bad_example, turns_fn=turns_fn)

  lora = jlora.Lora(model, jlora.LoraConfig(**config.lora))
  example = np.zeros((1, seq_len), np.int32)

  def logits(trainable, params, batch, rng):
    return lora.apply(params, trainable["lora"], batch["inputs"], position_ids=batch["positions"],
                      segment_ids=batch["segment_ids"], rngs=None if rng is None else {"dropout": rng})

  def token_losses(trainable, params, batch, rng):
    out = logits(trainable, params, batch, rng).astype(jnp.float32)
    mask = batch["loss_mask"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"]) * mask, mask

  def loss(trainable, params, batch, rng):
    losses, mask = token_losses(trainable, params, batch, rng)
    return jnp.sum(losses), {"weight": jnp.sum(mask)}

  def eval_sums(trainable, params, batch):
    losses, mask = token_losses(trainable, params, batch, None)
    return {"loss_sum": jnp.sum(losses), "weight": jnp.sum(mask)}

  def summarize_eval(sums):
    mean = sums["loss_sum"] / max(sums["weight"], 1.0)
    return {"eval/loss": mean, "eval/perplexity": float(np.exp(min(mean, 50.0)))}

  return Task(
      lora=lora,
      params=params,
      init_trainable=lambda key: {"lora": lora.init(key, params, example)},
      loss=loss,
      eval_sums=eval_sums,
      summarize_eval=summarize_eval,
      train_batches=lambda: batches("train", micro_batch, True, None),
      eval_batches=lambda: batches("validation", config.data.eval_batch_size, False, 1),
      count_tokens=lambda batch: int(np.sum(batch["segment_ids"] > 0)),
      metadata={"task": "causal_lm", "base_model": os.path.abspath(path)},
  )
