"""Causal-LM supervised fine-tuning of a Llama-family checkpoint: LoRA, packed sequences, masked loss.

Rows pack several examples (``segment_ids`` keep attention block-diagonal, ``positions`` restart per
example); the loss counts only trained tokens (assistant/completion), via ``loss_mask``.

The checkpoint is a Hugging Face directory or a GGUF file (``model.path``, or a file shipped inside a
pip package: ``model.package`` / ``model.package_file``). Chats render with the Zephyr-style
``default_template`` or, with ``data.chat_template="model"``, with the checkpoint's own chat template.
Optional extras: a generation eval on held-out prompts before and after training (``generation_eval``)
and a PEFT copy of the adapter in ``adapter/peft`` (``export.peft``).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import jlora
import jlora.peft
from jlora import models
from train import data, variants
from train.tasks import gguf_files, pydoc_sft, stdlib_summaries
from train.tasks.base import Task, load_base, quantization_metadata, registered_sources
from train.tasks.generation_eval import GenerationEval, Prompt, spread


def _checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.model.path:
    return config.model.path
  package = config.model.get("package", "")
  if config.model.create_tiny and package:  # the package file's tokenizer and template, tiny random weights
    like = gguf_files.package_file(package, config.model.package_file)
    projection_type = config.model.get("tiny_projection_type", "f32")
    name = "tiny_model.gguf" if projection_type == "f32" else f"tiny_model.{projection_type}.gguf"
    return gguf_files.create_tiny_gguf(os.path.join(workdir, name), like=like, seed=config.seed,
                                       vocab_size=config.model.get("tiny_vocab_size", 0) or None,
                                       projection_type=projection_type)
  if config.model.create_tiny:
    return pydoc_sft.create_tiny_llama(os.path.join(workdir, "tiny_llama"), seed=config.seed)
  if package:
    return gguf_files.package_file(package, config.model.package_file)
  raise ValueError("Set --config.model.path to a Hugging Face Llama-family checkpoint directory or GGUF file "
                   "(or model.create_tiny=True for a local smoke test).")


def _sources(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """``{"train", "validation"}`` data sources: a registered TFDS dataset by name, or local JSONL built to TFDS."""
  registered = registered_sources(config)
  if registered is not None:
    return registered
  source, raw = config.data.source, os.path.join(workdir, "data", "raw")
  if source == "pydoc_sft":
    paths = pydoc_sft.write_jsonl(raw)
  elif source == "stdlib_summaries":
    paths = stdlib_summaries.write_jsonl(raw, config.data.validation_fraction)
  else:
    paths = dict(source)
  builder = data.build_jsonl_instructions(paths, os.path.join(workdir, "data", "tfds"), name=config.data.name,
                                          on_bad_example=config.data.on_bad_example)
  return {split: data.data_source(builder, split) for split in ("train", "validation")}


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes what ``build`` reads from the workdir (a tiny checkpoint, the JSONL data and its TFDS dataset)."""
  _checkpoint(config, workdir)
  _sources(config, workdir)


def build(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  path = _checkpoint(config, workdir)
  model, params = load_base(path, config, mesh, scan_layers=config.model.scan_layers, remat=config.model.remat)
  tokenizer = models.load_tokenizer(path)
  tokenizer.no_truncation()
  tokenizer.no_padding()
  sources = _sources(config, workdir)
  text_field = config.data.tfds.text_field
  turns_fn = None if text_field == "text" else (lambda record: [("text", record[text_field].decode())])
  chat_template = config.data.get("chat_template", "")
  if chat_template == "model":
    model_template = models.load_chat_template(path)
    turns_fn = data.chat_template_turns(lambda messages: models.apply_chat_template(model_template, messages))
  elif chat_template:
    raise ValueError(f"data.chat_template must be '' (the default template) or 'model', got {chat_template!r}.")
  template = data.default_template(config.data.end_token, config.data.bos_token or None)
  seq_len, micro_batch = config.data.seq_len, config.data.batch_size // config.train.accum_steps

  def batches(split: str, batch_size: int, shuffle: bool, num_epochs):
    return data.lm_batches(sources[split], tokenizer, seq_len=seq_len, batch_size=batch_size,
                           template=template, seed=config.seed, shuffle=shuffle, num_epochs=num_epochs,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           on_bad_example=config.data.on_bad_example, turns_fn=turns_fn)

  lora = jlora.Lora(model, variants.lora_config(config))
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

  generation_eval = None
  if config.get("generation_eval") and config.generation_eval.num_prompts:
    if chat_template != "model":
      raise ValueError("generation_eval needs data.chat_template='model' (prompts as the model's template renders "
                       "them); set generation_eval.num_prompts=0 to switch it off.")
    generation_eval = GenerationEval(
        model=model, lora=lora, tokenizer=tokenizer,
        prompts=_held_out_prompts(sources["validation"], turns_fn, config.generation_eval.num_prompts),
        workdir=workdir, max_new_tokens=config.generation_eval.max_new_tokens,
        batch_size=config.generation_eval.batch_size, eos_ids=_end_ids(tokenizer, config.data.end_token, model),
        shown=config.generation_eval.shown)

  def export_peft(directory: str, params, adapters: dict, lora_config: jlora.LoraConfig) -> None:
    jlora.peft.save_pretrained(os.path.join(directory, "peft"), adapters, lora_config, model, params=params,
                               base_model_name_or_path=os.path.abspath(path))

  def init(key, params):
    params, adapters = lora.init_with_base(key, params, example)
    return params, {"lora": adapters}

  return Task(
      lora=lora,
      params=params,
      init=init,
      loss=loss,
      eval_sums=eval_sums,
      summarize_eval=summarize_eval,
      train_batches=lambda: batches("train", micro_batch, True, None),
      eval_batches=lambda: batches("validation", config.data.eval_batch_size, False, 1),
      count_tokens=lambda batch: int(np.sum(batch["segment_ids"] > 0)),
      metadata={"task": "causal_lm", "base_model": os.path.abspath(path),
                "base_quantization": quantization_metadata(config)},
      generation_eval=generation_eval,
      export_extra=export_peft if config.get("export") and config.export.peft else None,
  )


def _held_out_prompts(source, turns_fn, count: int) -> list[Prompt]:
  """``count`` held-out chats spread over the split: the rendered prompt, the last user turn, the answer."""
  prompts = []
  for index in spread(count, len(source)):
    record = source[index]
    turns = turns_fn(record)
    if not isinstance(turns, list):
      raise data.DataError(f"held-out example {index} cannot be a generation prompt: {turns}")
    users = [c.decode() for r, c in zip(record["role"], record["content"]) if r.decode() == "user"]
    prompts.append(Prompt(label=users[-1] if users else turns[0][1], text=turns[0][1], reference=turns[-1][1]))
  return prompts


def _end_ids(tokenizer, end_token: str, model) -> list[int]:
  """The template's end-of-turn token and the model's end-of-sequence token(s): either ends an answer."""
  ids = [tokenizer.token_to_id(end_token)]
  eos = model.config.eos_token_id
  ids += list(eos) if isinstance(eos, list | tuple) else [eos]
  return sorted({i for i in ids if i is not None})
