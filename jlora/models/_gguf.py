"""GGUF files (llama.cpp's one-file checkpoints) as a Hugging Face config and a tensor reader.

A GGUF file holds its hyper-parameters as metadata (``llama.block_count``, ...) and its tensors under
llama.cpp's names (``blk.3.attn_q.weight``), possibly quantized. :func:`hf_config_from_gguf` turns
the metadata into the ``config.json`` dictionary transformers would write, and :class:`GgufReader`
serves the tensors under Hugging Face names as float32 numpy arrays, so ``from_pretrained`` loads a
GGUF file through the same strict path as a safetensors directory.

Metadata and tensors are read with the ``gguf`` package (``GGUFReader``) and dequantized with its
own routines (``gguf.quants.dequantize``): every type that package dequantizes loads (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...). llama.cpp's converter changes two things that are
undone here: the rows of the ``llama`` architecture's Q and K projections are permuted for its
interleaved RoPE, and Gemma's zero-centred norm weights are stored as ``1 + w``.

:func:`load_keeping_blocks` (``from_pretrained(path, quantized="keep")``) loads the projection kernels
stored in Q4_0, Q4_1 or Q8_0 as ``jlora.quant.GgufBlocks`` instead: the file's blocks, never dequantized
on the host, dequantized per layer inside the model's call.
"""

import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jlora.models._errors import CheckpointError
from jlora.models._llama import LlamaConfig, LlamaForCausalLM
from jlora.models._name_maps import llama_name_map
from jlora.quant import _gguf_blocks
from jlora.sharding import param_specs

GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma")

_MAX_LISTED = 10
# Hugging Face module -> llama.cpp tensor kind; gguf.TENSOR_NAMES spells the GGUF name of each kind.
_HF_MODULES = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
    "model.layers.{i}.input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "model.layers.{i}.self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "model.layers.{i}.self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "model.layers.{i}.self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "model.layers.{i}.self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "model.layers.{i}.post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "model.layers.{i}.mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "model.layers.{i}.mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "model.layers.{i}.mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
# transformers' activation names of each architecture (GGUF does not record the activation).
_HIDDEN_ACT = {"llama": "silu", "qwen2": "silu", "gemma": "gelu_pytorch_tanh"}


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix)."""
  return pathlib.Path(path).suffix.lower() == GGUF_SUFFIX


@functools.lru_cache(maxsize=2)
def _read(path: pathlib.Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
  del mtime_ns, size  # part of the cache key only: a rewritten file is read again
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors of its own on a damaged file
    raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A ``gguf.GGUFReader`` over ``path`` (memory-mapped; nothing is dequantized yet).

  Parsing the metadata of a large vocabulary takes seconds, and a model, its tokenizer and its chat
  template are usually loaded from one file in a row, so the last two files opened stay open (the
  cache is keyed by path, modification time and size).
  """
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise CheckpointError(f"GGUF file {path} does not exist.")
  stat = path.stat()
  return _read(path, stat.st_mtime_ns, stat.st_size)


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  """The value of metadata ``key``: an int, float, bool, str, or a list of them; ``default`` if absent."""
  field = reader.get_field(key)
  if field is None:
    return default
  value = field.contents()
  return value.item() if isinstance(value, np.generic) else value


def _require(reader: gguf.GGUFReader, key: str) -> Any:
  value = metadata_value(reader, key)
  if value is None:
    raise CheckpointError(f"GGUF file {reader.data.filename} lacks the metadata key {key!r}.")
  return value


def architecture(reader: gguf.GGUFReader) -> str:
  """``general.architecture``, checked to be one ``jlora.models`` implements."""
  arch = _require(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(
        f"GGUF file {reader.data.filename} has architecture {arch!r}; jlora.models reads GGUF files of "
        f"{list(SUPPORTED_ARCHITECTURES)}."
    )
  return arch


def _refuse(reader: gguf.GGUFReader, key: str, why: str, allowed: tuple = (None,)) -> None:
  value = metadata_value(reader, key)
  if value not in allowed:
    raise CheckpointError(f"GGUF file {reader.data.filename} sets {key}={value!r}, which jlora.models does not "
                          f"support: {why}.")


def hf_config_from_gguf(reader: gguf.GGUFReader) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dictionary described by a GGUF file's metadata and tensor names.

  Layers, widths, heads and KV heads, head size, context length, RoPE base, norm epsilon and the
  bos/eos/pad token ids come from the metadata; the embeddings are tied when the file has no
  ``output.weight``; attention and MLP biases are read off the tensors that exist. Features the
  models do not implement (RoPE scaling, partial rotary, mixture of experts, sliding windows) raise.

  Args:
    reader: an open GGUF file (:func:`open_gguf`).

  Returns:
    A dict that ``jlora.models.config_from_hf`` accepts (``model_type`` is the GGUF architecture).

  Raises:
    CheckpointError: an unsupported architecture or setting, or missing metadata.
  """
  arch = architecture(reader)
  key = lambda name: f"{arch}.{name}"  # noqa: E731
  names = {tensor.name for tensor in reader.tensors}
  heads = _require(reader, key("attention.head_count"))
  kv_heads = metadata_value(reader, key("attention.head_count_kv"), heads)
  if isinstance(heads, list) or isinstance(kv_heads, list):
    raise CheckpointError(f"GGUF file {reader.data.filename} has per-layer head counts, which jlora.models does "
                          "not support.")
  hidden = _require(reader, key("embedding_length"))
  head_dim = metadata_value(reader, key("attention.key_length"), hidden // heads)
  _refuse(reader, key("attention.value_length"), "values and keys must have one head size", (None, head_dim))
  _refuse(reader, key("rope.dimension_count"), "rotary embeddings must span the whole head", (None, head_dim))
  _refuse(reader, key("rope.scaling.type"), "only unscaled RoPE is read from GGUF metadata", (None, "none"))
  _refuse(reader, key("expert_count"), "mixture-of-experts layers are not implemented", (None, 0))
  _refuse(reader, key("attention.sliding_window"), "sliding-window attention is not read from GGUF files")
  if "rope_freqs.weight" in names:  # llama3-style RoPE scaling, stored as per-frequency factors
    raise CheckpointError(f"GGUF file {reader.data.filename} scales RoPE with a rope_freqs.weight tensor (Llama "
                          "3.1 style), which jlora.models cannot read from GGUF files; load the Hugging Face "
                          "checkpoint instead.")
  vocab_size = metadata_value(reader, key("vocab_size"))
  if vocab_size is None:  # older files: the vocabulary's length, else the embedding's rows
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab_size = len(tokens.data) if tokens is not None else _embedding_rows(reader)
  hf: dict[str, Any] = {
      "model_type": arch,
      "vocab_size": vocab_size,
      "hidden_size": hidden,
      "intermediate_size": _require(reader, key("feed_forward_length")),
      "num_hidden_layers": _require(reader, key("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "rms_norm_eps": float(_require(reader, key("attention.layer_norm_rms_epsilon"))),
      "rope_theta": float(metadata_value(reader, key("rope.freq_base"), 10000.0)),
      "hidden_act": _HIDDEN_ACT[arch],
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": metadata_value(reader, "tokenizer.ggml.padding_token_id"),
  }
  context = metadata_value(reader, key("context_length"))
  if context is not None:
    hf["max_position_embeddings"] = context
  if arch == "llama":  # Hugging Face's Llama has one switch for all four attention biases
    hf["attention_bias"] = "blk.0.attn_q.bias" in names
    hf["mlp_bias"] = "blk.0.ffn_up.bias" in names
  return hf


def _embedding_rows(reader: gguf.GGUFReader) -> int:
  for tensor in reader.tensors:
    if tensor.name == "token_embd.weight":
      return int(tensor.shape[-1])  # GGUF lists dimensions innermost first
  raise CheckpointError(f"GGUF file {reader.data.filename} has no vocab_size and no token_embd.weight tensor.")


def gguf_name(hf_name: str) -> str:
  """The llama.cpp name of a Hugging Face tensor name, e.g. ``blk.3.attn_q.weight``."""
  module, _, suffix = hf_name.rpartition(".")
  parts = module.split(".")
  layer = None
  if module.startswith("model.layers."):
    layer = int(parts[2])
    module = ".".join(parts[:2] + ["{i}"] + parts[3:])
  kind = _HF_MODULES[module]
  return gguf.TENSOR_NAMES[kind].format(bid=layer) + "." + suffix


def _listing(kind: str, items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"{kind} ({len(items)}): {shown}{more}"


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor name -> shape, for every tensor the model's parameters need."""
  model = LlamaForCausalLM(dataclasses.replace(config, scan_layers=True))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  shapes = traverse_util.flatten_dict(params, sep="/")
  names = llama_name_map(config)
  expected = {}
  for rule in names.rules:
    shape = shapes[rule.param_path.replace("_{i}", "")].shape
    shape = shape[1:] if rule.per_layer else shape
    shape = shape[::-1] if rule.transpose else shape
    for i in range(names.num_layers) if rule.per_layer else [None]:
      expected[rule.hf_name.format(i=i)] = tuple(shape)
  return expected


class GgufReader:
  """The tensors of a GGUF file under Hugging Face names, dequantized to float32 on access.

  Has the interface ``from_pretrained`` reads checkpoints through (``names``, ``shape``, ``get``,
  ``get_slice``, a context manager). Checked on construction: every tensor the model needs is in
  the file with the right shape, and the file has no other tensor; problems are listed together,
  each under its GGUF name.

  Attributes:
    directory: the GGUF file (named so for the messages of ``from_pretrained``).
  """

  def __init__(self, reader: gguf.GGUFReader, config: LlamaConfig):
    self.directory = pathlib.Path(reader.data.filename)
    self._config = config
    self._tensors = {tensor.name: tensor for tensor in reader.tensors}
    expected = _expected_shapes(config)
    self._gguf_names = {hf: gguf_name(hf) for hf in expected}
    self._cache: dict[str, np.ndarray] = {}
    missing, wrong_shape = [], []
    for hf, name in self._gguf_names.items():
      if name not in self._tensors:
        missing.append(f"{name!r} ({hf})")
      elif self.shape(hf) != expected[hf]:
        wrong_shape.append(f"{name!r} has shape {self.shape(hf)}, expected {expected[hf]} ({hf})")
    unexpected = sorted(repr(name) for name in set(self._tensors) - set(self._gguf_names.values()))
    problems = []
    if missing:
      problems.append(_listing("missing tensors", missing))
    if unexpected:
      problems.append(_listing("unexpected tensors", unexpected))
    if wrong_shape:
      problems.append(_listing("tensors with the wrong shape", wrong_shape))
    if problems:
      raise CheckpointError(
          f"GGUF file {self.directory} does not fit a {config.model_type} model with its metadata's sizes: "
          + "; ".join(problems) + "."
      )

  def __enter__(self) -> "GgufReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self._cache.clear()

  def names(self) -> Iterator[str]:
    """Hugging Face names of the tensors (all of them map to one, or construction failed)."""
    return iter(self._gguf_names)

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor ``name`` in Hugging Face's layout (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in self._tensors[self._gguf_names[name]].shape[::-1])

  def get(self, name: str) -> np.ndarray:
    """Tensor ``name`` dequantized to float32, with llama.cpp's layout changes undone."""
    tensor = self._tensors[self._gguf_names[name]]
    try:
      array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
      raise CheckpointError(f"GGUF tensor {tensor.name!r} of {self.directory} has type {tensor.tensor_type.name}, "
                            f"which the gguf package does not dequantize: {e}") from e
    array = self._unpermute(name, np.asarray(array, np.float32).reshape(self.shape(name)))
    if self._config.norm_zero_centered and name.endswith("norm.weight"):
      array = array - np.float32(1.0)
    return array

  def ggml_type(self, name: str) -> str:
    """The GGUF type of tensor ``name``, lower case (``"q4_1"``, ``"f32"``, ``"q6_k"``, ...)."""
    return self._tensors[self._gguf_names[name]].tensor_type.name.lower()

  def blocks(self, name: str, dtype: Any) -> "_gguf_blocks.GgufBlocks":
    """Weight ``name`` (a Q4_0, Q4_1 or Q8_0 ``[out, in]`` matrix) as the ``(in, out)`` kernel of its own blocks.

    Nothing is dequantized: the Q/K row permutation acts on output rows, which are whole rows of
    blocks, so it is undone by permuting the rows of the codes and scales.
    """
    tensor = self._tensors[self._gguf_names[name]]
    kept = _gguf_blocks.gguf_blocks(np.asarray(tensor.data), self.ggml_type(name), dtype)
    if kept.kernel_shape[::-1] != self.shape(name):
      raise CheckpointError(f"GGUF tensor {tensor.name!r} of {self.directory} holds {kept.kernel_shape[::-1]} "
                            f"values in its blocks, expected {self.shape(name)}.")
    return dataclasses.replace(kept, **{field: self._unpermute(name, getattr(kept, field))
                                        for field in ("codes", "scales", "mins") if getattr(kept, field) is not None})

  def _unpermute(self, name: str, rows: np.ndarray) -> np.ndarray:
    config = self._config
    if config.model_type == "llama" and ".self_attn.q_proj." in name:
      return _unpermute_rows(rows, config.num_attention_heads)
    if config.model_type == "llama" and ".self_attn.k_proj." in name:
      return _unpermute_rows(rows, config.num_key_value_heads)
    return rows

  def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` of tensor ``name``; the whole tensor is dequantized once and kept for later blocks."""
    if name not in self._cache:
      self._cache[name] = self.get(name)
    return self._cache[name][index]


def _unpermute_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row order: within each head it interleaves the two RoPE halves.

  llama.cpp stores row ``2 * j + s`` of a head (``s`` in {0, 1}) where Hugging Face has row
  ``s * half + j``; this maps the GGUF rows back (weights ``(heads * head_dim, in)``, biases, or the
  ``(heads * head_dim, blocks, ...)`` codes and scales of a weight kept in its blocks).
  """
  rows = array.shape[0]
  half = rows // heads // 2
  return array.reshape(heads, half, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)



QUANTIZED_MODES = ("dequantize", "keep")


def load_keeping_blocks(reader: GgufReader, model: LlamaForCausalLM, mesh: Any = None, rules: Any = ()) -> dict:
  """The params of ``model`` from a GGUF file, its Q4_0 / Q4_1 / Q8_0 projection kernels kept in their blocks.

  A projection (the ``q/k/v/o``, ``gate/up/down`` kernels and an untied ``lm_head``) whose tensors all
  have one of those types becomes a ``jlora.quant.GgufBlocks`` in flax's ``(in, out)`` layout, stacked
  along a leading layer axis for ``nn.scan``, Q/K rows unpermuted, never dequantized here. Every other
  tensor (embeddings, norms, biases, and projections of other types, K-quants or a mix of types over the
  layers) is dequantized to float32 and cast to ``param_dtype``, as ``from_pretrained`` does.

  Args:
    reader: the file's tensors, checked against ``model``'s sizes.
    model: the ``LlamaForCausalLM`` the file describes (its ``param_dtype`` is the kept kernels' dtype).
    mesh: with a mesh, every leaf (each kept kernel's codes and statistics too) is a global array sharded
      by ``rules`` (``jlora.sharding.param_specs``: blocks are never split). Each host reads the file's
      quantized tensors whole; that is the point of keeping them small.
    rules: ``(regex, PartitionSpec)`` rules, with ``mesh``.

  Raises:
    CheckpointError: the file has no projection kernel of a kept type.
  """
  config = model.config
  names = llama_name_map(config)
  param_dtype = jnp.dtype(config.param_dtype)
  flat: dict[str, Any] = {}
  kept = 0
  for rule in names.rules:
    layers = list(range(names.num_layers)) if rule.per_layer else [None]
    hf_names = [rule.hf_name.format(i=i) for i in layers]
    types = {reader.ggml_type(name) for name in hf_names}
    keep = rule.transpose and rule.param_path.endswith("/kernel") and len(types) == 1 and types <= set(
        _gguf_blocks.GGUF_TYPES)
    if keep:
      values = [reader.blocks(name, param_dtype) for name in hf_names]
      kept += 1
    else:
      values = [(reader.get(name).T if rule.transpose else reader.get(name)).astype(param_dtype) for name in hf_names]
    if rule.per_layer and config.scan_layers:
      flat[rule.param_path.replace("_{i}", "")] = jax.tree.map(lambda *layer: np.stack(layer), *values)
    else:
      flat.update({rule.param_path.format(i=i): value for i, value in zip(layers, values)})
  if not kept:
    raise CheckpointError(
        f"GGUF file {reader.directory} has no projection kernel stored as {sorted(_gguf_blocks.GGUF_TYPES)} in every "
        "layer, so quantized='keep' would keep nothing; load it with quantized='dequantize' (and "
        "jlora.quant.quantize it to train over a quantized base).")
  params = traverse_util.unflatten_dict(flat, sep="/")
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  specs = param_specs(params, rules, mesh)
  return jax.tree.map(lambda leaf, spec: jax.make_array_from_callback(
      leaf.shape, jax.sharding.NamedSharding(mesh, spec), lambda index: leaf[index]), params, specs)
