"""``from_pretrained`` / ``save_pretrained``: Hugging Face checkpoint directories <-> (model, params).

Loading is strict: every parameter must come from exactly one tensor of the right shape, and every
tensor must be used, except the buffers and tied heads that the architecture's name map lists as
ignorable. All problems are reported together, each naming its tensor.
"""

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from jlora.models._bert import BertConfig, BertModel
from jlora.models._errors import CheckpointError
from jlora.models._gguf import QUANTIZED_MODES, GgufReader, hf_config_from_gguf, is_gguf, load_keeping_blocks, open_gguf
from jlora.models._gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.models._hf_configs import ModelConfig, config_from_hf, config_to_hf
from jlora.models._llama import LlamaConfig, LlamaForCausalLM
from jlora.models._name_maps import NameMap, name_map
from jlora.models._safetensors import WEIGHTS_FILE, SafetensorsReader, write_safetensors
from jlora.models._stacking import RematPolicy
from jlora.sharding import param_specs, rules_for

Params = Any  # a nested dict of arrays
Model = LlamaForCausalLM | GPT2LMHeadModel | BertModel

_MAX_LISTED = 10


class _Slot(NamedTuple):
  """One Hugging Face tensor and where it lives in the params (``layer`` indexes a stacked leaf)."""

  hf_name: str
  param_path: str
  layer: int | None
  transpose: bool


def model_for_config(config: ModelConfig) -> Model:
  """The flax module of a config: ``LlamaForCausalLM``, ``GPT2LMHeadModel`` or ``BertModel``."""
  if isinstance(config, LlamaConfig):
    return LlamaForCausalLM(config)
  if isinstance(config, GPT2Config):
    return GPT2LMHeadModel(config)
  if isinstance(config, BertConfig):
    return BertModel(config)
  raise TypeError(f"Not a jlora.models config: {type(config).__name__}.")


def _slots(names: NameMap, scan: bool) -> list[_Slot]:
  slots = []
  for rule in names.rules:
    if not rule.per_layer:
      slots.append(_Slot(rule.hf_name, rule.param_path, None, rule.transpose))
      continue
    for i in range(names.num_layers):
      path = rule.param_path.replace("_{i}", "") if scan else rule.param_path.format(i=i)
      slots.append(_Slot(rule.hf_name.format(i=i), path, i if scan else None, rule.transpose))
  return slots


def _canonical_names(names: Sequence[str], name_map_: NameMap, ignore: Sequence[str]) -> dict[str, str]:
  """Maps canonical tensor names (as in the name map) to the names used by the checkpoint.

  Tensors whose checkpoint or canonical name fullmatches a regex of ``ignore`` are left out.
  """
  prefix = name_map_.base_prefix
  if name_map_.prefixed:
    if any(name.startswith(prefix) for name in names):
      canonical = {name: name for name in names}
    else:
      canonical = {prefix + name: name for name in names}  # a base-model file (e.g. GPT2Model)
  else:
    canonical = {name.removeprefix(prefix): name for name in names}  # e.g. BertForMaskedLM's "bert." body
  return {
      name: original
      for name, original in canonical.items()
      if not any(re.fullmatch(pattern, n) for pattern in ignore for n in (name, original))
  }


def _expected_params(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
  return traverse_util.flatten_dict(shapes, sep="/")


def _check_coverage(slots: list[_Slot], expected: dict[str, jax.ShapeDtypeStruct]) -> None:
  covered = {slot.param_path for slot in slots}
  if covered != set(expected):
    raise RuntimeError(  # a bug in a name map, not in the user's checkpoint
        f"jlora.models name map out of sync with the module: unmapped params {sorted(set(expected) - covered)}, "
        f"mapped but absent {sorted(covered - set(expected))}."
    )


def _hf_shape(slot: _Slot, expected: dict[str, jax.ShapeDtypeStruct]) -> tuple[int, ...]:
  shape = expected[slot.param_path].shape
  if slot.layer is not None:
    shape = shape[1:]
  return shape[::-1] if slot.transpose else shape


def _listing(kind: str, items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"{kind} ({len(items)}): {shown}{more}"


def _load_params(
    reader: SafetensorsReader,
    model: Model,
    ignore: Sequence[str],
    mesh: Mesh | None = None,
    rules: Iterable[tuple[str, Any]] = (),
) -> Params:
  config = model.config
  names = name_map(config)
  slots = _slots(names, config.scan_layers)
  expected = _expected_params(model)
  _check_coverage(slots, expected)
  canonical = _canonical_names(list(reader.names()), names, ignore)

  missing, wrong_shape = [], []
  for slot in slots:
    if slot.hf_name not in canonical:
      missing.append(repr(slot.hf_name))
      continue
    got, want = reader.shape(canonical[slot.hf_name]), _hf_shape(slot, expected)
    if got != want:
      wrong_shape.append(f"{canonical[slot.hf_name]!r} has shape {got}, expected {want} (param {slot.param_path})")
  used = {slot.hf_name for slot in slots}
  unexpected = [
      repr(original)
      for name, original in canonical.items()
      if name not in used and not any(re.fullmatch(pattern, name) for pattern in names.ignored)
  ]
  problems = []
  if missing:
    problems.append(_listing("missing tensors", missing))
  if unexpected:
    problems.append(_listing("unexpected tensors", unexpected) + " (pass ignore=[regex, ...] to skip them)")
  if wrong_shape:
    problems.append(_listing("tensors with the wrong shape", wrong_shape))
  if problems:
    raise CheckpointError(
        f"Checkpoint {reader.directory} does not fit {type(model).__name__}: " + "; ".join(problems) + "."
    )

  if mesh is not None:
    return _load_sharded(reader, slots, canonical, expected, config.param_dtype, mesh, rules)
  param_dtype = config.param_dtype
  layers: dict[str, list[np.ndarray | None]] = {}
  flat: dict[str, jax.Array] = {}
  for slot in slots:
    array = reader.get(canonical[slot.hf_name])
    array = (array.T if slot.transpose else array).astype(param_dtype)
    if slot.layer is None:
      flat[slot.param_path] = jnp.asarray(array)
    else:
      layers.setdefault(slot.param_path, [None] * names.num_layers)[slot.layer] = array
  for path, arrays in layers.items():
    flat[path] = jnp.asarray(np.stack(arrays))
  return traverse_util.unflatten_dict(flat, sep="/")


def _shard_reader(
    reader: SafetensorsReader, tensors: list[str], transpose: bool, stacked: bool, param_dtype: jnp.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """The ``jax.make_array_from_callback`` callback of one param: reads just the requested block.

  ``tensors`` are the checkpoint names of the param (one per layer when ``stacked``). Devices that
  hold the same block (replicas) share one read.
  """
  blocks: dict[tuple, np.ndarray] = {}

  def read_one(name: str, index: tuple[slice, ...]) -> np.ndarray:
    block = reader.get_slice(name, index[::-1] if transpose else index)
    return (block.T if transpose else block).astype(param_dtype)

  def read(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable before Python 3.12
    if key not in blocks:
      if stacked:
        layers = range(len(tensors))[index[0]]
        blocks[key] = np.stack([read_one(tensors[layer], index[1:]) for layer in layers])
      else:
        blocks[key] = read_one(tensors[0], index)
    return blocks[key]

  return read


def _load_sharded(
    reader: SafetensorsReader,
    slots: list[_Slot],
    canonical: dict[str, str],
    expected: dict[str, jax.ShapeDtypeStruct],
    param_dtype: jnp.dtype,
    mesh: Mesh,
    rules: Iterable[tuple[str, Any]],
) -> Params:
  """Each param as a global ``jax.Array`` sharded by ``rules``, built from the blocks this host's devices hold."""
  shapes = traverse_util.unflatten_dict(expected, sep="/")
  specs = traverse_util.flatten_dict(param_specs(shapes, rules, mesh), sep="/")
  tensors: dict[str, list[str]] = {}
  for slot in slots:
    tensors.setdefault(slot.param_path, []).append(canonical[slot.hf_name])
  transposed = {slot.param_path: slot.transpose for slot in slots}
  stacked = {slot.param_path: slot.layer is not None for slot in slots}
  flat = {}
  for path, shape in expected.items():
    read = _shard_reader(reader, tensors[path], transposed[path], stacked[path], param_dtype)
    flat[path] = jax.make_array_from_callback(shape.shape, NamedSharding(mesh, specs[path]), read, dtype=param_dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    scan_layers: bool | None = None,
    remat: RematPolicy = "none",
    ignore: Sequence[str] = (),
    mesh: Mesh | None = None,
    rules: Iterable[tuple[str, Any]] | None = None,
    quantized: str = "dequantize",
) -> tuple[Model, Params]:
  """Loads a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) or a GGUF file.

  ``model_type`` picks the module: ``llama``, ``mistral``, ``qwen2``, ``gemma`` ->
  :class:`LlamaForCausalLM`; ``gpt2`` -> :class:`GPT2LMHeadModel`; ``bert`` -> :class:`BertModel`.
  A ``*.gguf`` file (llama.cpp's format, architectures ``llama``, ``qwen2``, ``gemma``) loads the same
  way: its metadata gives the config, its tensors (any type the ``gguf`` package dequantizes) become
  float32 before the cast to ``param_dtype``.
  Sharded checkpoints (``model.safetensors.index.json``) and bfloat16 tensors are read with numpy;
  torch is never imported. Kernels are transposed to ``(in, out)``; with ``scan_layers`` per-layer
  tensors are stacked along a leading axis.

  With a ``mesh``, every param is a global ``jax.Array`` sharded by ``rules``
  (``jlora.sharding.param_specs``), built by ``jax.make_array_from_callback``: each host reads from the
  files only the blocks its own devices hold (a stacked param reads its block of every layer's
  tensor), so no host holds a whole split tensor. Replicated params are read whole.

  Args:
    path: the checkpoint directory, or a ``.gguf`` file.
    dtype: compute dtype of the model.
    param_dtype: dtype the parameters are converted to.
    scan_layers: stack layers with ``nn.scan``; None keeps the default (on for decoders, off for BERT).
    remat: rematerialisation policy of each layer: "none", "full", "dots" or "dots_no_batch".
    ignore: regexes (fullmatch) of checkpoint tensor names to leave out, as if absent: e.g.
      ``[r"cls\\..*"]`` for the masked-LM head of a ``BertForMaskedLM`` file, or ``[r"pooler\\..*"]``
      for a BERT without its pooler. Ignoring a tensor the model needs is a "missing" error.
    mesh: a ``jax.sharding.Mesh`` (``jlora.sharding.make_mesh``) to load the params straight into
      shards; None loads them whole onto the default device.
    rules: ``(regex, PartitionSpec)`` sharding rules for the params (with ``mesh`` only); None uses
      ``jlora.sharding.rules_for(model)``.
    quantized: what becomes of a GGUF file's quantized tensors. ``"dequantize"`` (default): every tensor
      is float. ``"keep"``: each projection kernel stored as Q4_0, Q4_1 or Q8_0 in every layer stays in
      its blocks as a ``jlora.quant.GgufBlocks`` (the frozen base of QLoRA: ``jlora.Lora.apply`` and
      ``jlora.quant.apply`` dequantize it inside its module's call); embeddings, norms and tensors of
      other types (K-quants, ...) are dequantized as by default. GGUF files only.

  Returns:
    ``(model, params)``: a flax module and its ``params`` tree; call
    ``model.apply({"params": params}, input_ids, attention_mask)``.

  Raises:
    CheckpointError: unsupported ``model_type`` or setting; missing, unexpected or mis-shaped tensors
      (all named in the message); ``rules`` without a ``mesh``; ``quantized="keep"`` for a directory, with
      ``ignore``, or for a file without Q4_0 / Q4_1 / Q8_0 projections.
    JloraError: with ``mesh``, params that no rule covers or whose spec does not fit the mesh.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jlora import models
    >>> config = models.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    >>> model = models.GPT2LMHeadModel(config)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> path = tempfile.mkdtemp()
    >>> models.save_pretrained(path, model, params)
    >>> loaded, loaded_params = models.from_pretrained(path, scan_layers=False)
    >>> loaded.config == dataclasses.replace(config, scan_layers=False)
    True
    >>> loaded_params["transformer"]["h_1"]["attn"]["c_attn"]["kernel"].shape
    (16, 48)
  """
  if rules is not None and mesh is None:
    raise CheckpointError("from_pretrained got sharding rules but no mesh; pass mesh=jlora.sharding.make_mesh(...).")
  directory = pathlib.Path(path)
  if quantized not in QUANTIZED_MODES:
    raise CheckpointError(f"quantized must be one of {list(QUANTIZED_MODES)}, got {quantized!r}.")
  if quantized == "keep" and (not is_gguf(directory) or ignore):
    raise CheckpointError(f"quantized='keep' keeps the blocks of a GGUF file's tensors (which holds exactly the model's "
                          f"tensors, so nothing to ignore); got {directory}{' with ignore' if ignore else ''}.")
  if is_gguf(directory):
    gguf_file = open_gguf(directory)
    config = config_from_hf(hf_config_from_gguf(gguf_file))
    open_reader = lambda: GgufReader(gguf_file, config)  # noqa: E731
  else:
    config_file = directory / "config.json"
    if not config_file.exists():
      raise CheckpointError(f"{directory} has no config.json.")
    config = config_from_hf(json.loads(config_file.read_text()))
    open_reader = lambda: SafetensorsReader(directory)  # noqa: E731
  runtime: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
  if scan_layers is not None:
    runtime["scan_layers"] = scan_layers
  with open_reader() as reader:
    if isinstance(config, BertConfig):
      # The pooler is optional: BertModel files have it, sentence encoders may not use it.
      canonical = _canonical_names(list(reader.names()), name_map(config), ignore)
      runtime["add_pooling_layer"] = any(name.startswith("pooler.") for name in canonical)
    model = model_for_config(dataclasses.replace(config, **runtime))
    if mesh is not None and rules is None:
      rules = rules_for(model)
    if quantized == "keep":
      params = load_keeping_blocks(reader, model, mesh, rules or ())
    else:
      params = _load_params(reader, model, ignore, mesh, rules or ())
  return model, params


def save_pretrained(path: str | os.PathLike, model: Model, params: Params) -> None:
  """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's format.

  The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (decoders) or
  ``transformers.AutoModel.from_pretrained`` (BERT), and with :func:`from_pretrained`. Tensors keep
  the dtype of ``params``. Merge LoRA adapters into ``params`` first: extra leaves are refused.

  Args:
    path: the directory to write (created if needed).
    model: a module from ``jlora.models``.
    params: its ``params`` tree (stacked or unrolled layers, as ``model.config.scan_layers`` says).

  Raises:
    CheckpointError: ``params`` does not match the model's parameter structure or shapes.
  """
  config = model.config
  slots = _slots(name_map(config), config.scan_layers)
  expected = _expected_params(model)
  _check_coverage(slots, expected)
  flat = traverse_util.flatten_dict(params, sep="/")
  problems = []
  if set(flat) != set(expected):
    problems += [f"missing param {p}" for p in sorted(set(expected) - set(flat))]
    problems += [f"unexpected param {p}" for p in sorted(set(flat) - set(expected))]
  problems += [
      f"param {p} has shape {np.shape(flat[p])}, expected {s.shape}"
      for p, s in expected.items()
      if p in flat and np.shape(flat[p]) != s.shape
  ]
  if problems:
    raise CheckpointError(f"params do not fit {type(model).__name__}: " + "; ".join(problems[:_MAX_LISTED]) + ".")

  tensors = {}
  for slot in slots:
    array = np.asarray(jax.device_get(flat[slot.param_path]))
    if slot.layer is not None:
      array = array[slot.layer]
    tensors[slot.hf_name] = array.T if slot.transpose else array
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  stale = sorted(p.name for p in directory.glob("*.safetensors*") if p.name != WEIGHTS_FILE)
  if stale:
    raise CheckpointError(f"{directory} already holds other weights ({stale}); write into a fresh directory.")
  hf_config = config_to_hf(config)
  hf_config["dtype"] = tensors[slots[0].hf_name].dtype.name
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  write_safetensors(directory / WEIGHTS_FILE, tensors)
