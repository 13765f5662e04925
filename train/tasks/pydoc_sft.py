"""Local stand-ins for the causal-LM job, built offline from text that ships with Python.

* ``write_jsonl``: chat-style SFT data from the interpreter's help topics (``pydoc_data``): the user
  asks about a topic, the assistant answers with a paragraph of its help text.
* ``create_tiny_llama``: a tiny random-weight Llama checkpoint in Hugging Face format (config.json,
  model.safetensors, tokenizer.json with a BPE tokenizer trained on that text), so the SFT smoke run
  exercises the real loading path without any download.
"""

import hashlib
import json
import os
from pydoc_data.topics import topics

import jax
import tokenizers

from jlora import models
from train.tasks.base import write_splits

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def _paragraphs() -> list[tuple[str, int, str]]:
  out = []
  for name in sorted(topics):
    for i, paragraph in enumerate(p.strip() for p in topics[name].split("\n\n")):
      if 40 <= len(paragraph) <= 400:
        out.append((name, i, " ".join(paragraph.split())))
  return out


def write_jsonl(directory: str, validation_fraction: float = 0.1) -> dict[str, str]:
  """``train.jsonl``/``validation.jsonl`` of ``{"messages": [user, assistant]}``; hash split by paragraph."""
  lines: dict[str, list[str]] = {"train": [], "validation": []}
  for name, i, paragraph in _paragraphs():
    bucket = int(hashlib.sha256(paragraph.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    record = {"messages": [{"role": "user", "content": f"What does the Python help on '{name}' say (part {i})?"},
                           {"role": "assistant", "content": paragraph}]}
    lines["validation" if bucket < validation_fraction else "train"].append(json.dumps(record) + "\n")
  return write_splits(directory, lines)


def create_tiny_llama(directory: str, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                      seed: int = 0) -> str:
  """Writes a random-weight Llama checkpoint with a trained BPE tokenizer to ``directory``; returns it."""
  if os.path.exists(os.path.join(directory, "config.json")):
    return directory
  os.makedirs(directory, exist_ok=True)
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator((p for _, _, p in _paragraphs()), trainer)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  config = models.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
                              intermediate_size=4 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=512)
  model = models.LlamaForCausalLM(config)
  params = model.init(jax.random.key(seed), jax.numpy.ones((1, 8), jax.numpy.int32))["params"]
  models.save_pretrained(directory, model, params)
  return directory
