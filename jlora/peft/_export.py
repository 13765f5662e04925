"""``save_pretrained``: a jlora adapter written as a Hugging Face PEFT LoRA adapter directory."""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import Lora
from jlora._safety import write_manifest
from jlora._safety._manifest import MANIFEST
from jlora._safety._trees import to_host
from jlora.models._bert import BertConfig
from jlora.models._hf_configs import config_to_hf
from jlora.peft._fingerprint import METADATA_KEY, base_fingerprint
from jlora.peft._matching import EMBEDDING_LAYER_NAMES, pattern_for, target_modules_for
from jlora.peft._modules import HfModule, ModuleTable, module_table
from jlora.variants import to_plain_lora, variant_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def param_shapes(model) -> dict[str, tuple[int, ...]]:
  """``{'/'-joined param path: shape}`` of a ``jlora.models`` module, from an abstract init."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  return {_paths.join(path): tuple(leaf.shape) for path, leaf in _paths.iter_leaves(shapes)}


def default_task_type(model) -> str:
  return "FEATURE_EXTRACTION" if isinstance(model.config, BertConfig) else "CAUSAL_LM"


def _adapter_nodes(adapters: Mapping, config: LoraConfig) -> dict[str, Mapping]:
  names = set(variant_for(config).leaf_names)
  nodes = dict(_paths.iter_dicts(adapters, lambda d: bool(names & set(d)) or "lora_a" in d))
  for path, node in nodes.items():
    if set(node) != names:
      raise JloraError(f"Adapter at '{_paths.join(path)}' has keys {sorted(node)}; the LoraConfig describes "
                       f"{variant_for(config).name} adapters, which have exactly {sorted(names)}.")
  if sum(1 for _ in _paths.iter_leaves(adapters)) != len(names) * len(nodes):
    raise JloraError(f"Adapter tree has leaves outside any {sorted(names)} node.")
  return {_paths.join(path): node for path, node in nodes.items()}


def _layer_modules(table: ModuleTable, path: str, kernel_shape: tuple[int, ...]) -> list[HfModule]:
  if (path, 0) in table.by_path:
    return [table.by_path[(path, i)] for i in range(kernel_shape[0])]
  if (path, None) in table.by_path:
    return [table.by_path[(path, None)]]
  raise JloraError(f"Adapter at '{path}' is not on an nn.Linear/Conv1D/nn.Embedding weight of the Hugging Face "
                   "model, so PEFT has no module to put it on.")


def _number(value: float) -> int | float:
  return int(value) if float(value).is_integer() else float(value)


def _hf_weight(module: HfModule, kernel: np.ndarray) -> np.ndarray:
  return kernel.T if module.kind == "linear" else kernel


def save_pretrained(path: str | os.PathLike, adapters: Mapping, config: LoraConfig, model, *,
                    params: Mapping | None = None, base_model_name_or_path: str | None = None,
                    task_type: str | None = "auto", manifest: bool = True,
                    initial_adapters: Mapping | None = None) -> dict[str, Any]:
  """Writes a jlora adapter as a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

  The directory is what ``peft_model.save_pretrained`` writes for the same adapter on the transformers
  model: keys ``base_model.model.<module>.lora_A.weight`` (``(r, in)``) and ``lora_B.weight``
  (``(out, r)``), ``lora_embedding_A``/``lora_embedding_B`` for embeddings, stacked (``nn.scan``)
  adapters split into per-layer keys, and the embedding base weights PEFT adds when
  ``embed_tokens``/``lm_head`` are targeted (given ``params``). ``target_modules``, ``rank_pattern`` and
  ``alpha_pattern`` are chosen so that PEFT's matching rules select exactly the adapted modules with
  exactly their ranks and alphas; GPT-2's ``Conv1D`` sets ``fan_in_fan_out``. A LoRA on a tied input
  embedding (also the LM head in jlora) is written with PEFT's ``ensure_weight_tying`` (Llama family).

  VeRA (``variant="vera"``) is written as PEFT's VeRA (``peft_type`` VERA): ``vera_lambda_b``/``vera_lambda_d``
  per module and the projections (``params["jlora:state"]["vera"]`` when ``params`` has them, else those
  ``projection_seed`` draws) as ``base_model.vera_A``/``vera_B``. AdaLoRA (``variant="adalora"``) as PEFT's
  AdaLoRA: ``lora_A``/``lora_E``/``lora_B`` at each kernel's rank, with PEFT's ``rank_pattern`` for pruned ones
  (``jlora.adalora_resize``).

  DoRA (``use_dora``) adds each module's ``lora_magnitude_vector`` (PEFT's name, ``(fan_out,)``). A
  PiSSA/OLoRA adapter (``init="pissa"``, ...) trains on the residual base, so it is written as PEFT's
  ``path_initial_model_for_weight_conversion`` writes it: the rank-``2r`` plain LoRA ``[A | A0]``,
  ``[B ; -B0]`` (alphas doubled, so every scale is unchanged) that applies to the *original* base; pass the
  adapters as ``init_with_base`` returned them as ``initial_adapters``, and the original params as ``params``.

  Args:
    path: the output directory (created; must not already hold an adapter).
    adapters: the jlora adapter tree of ``model``.
    config: its LoraConfig.
    model: the ``jlora.models`` module (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``).
    params: the base params; given, the base fingerprint (``jlora.peft.base_fingerprint``) goes into
      the safetensors metadata and PEFT's embedding base weights are written.
    base_model_name_or_path: the Hub id or path of the base, as PEFT records it.
    task_type: PEFT's ``task_type``; ``"auto"`` is ``CAUSAL_LM`` for decoders and
      ``FEATURE_EXTRACTION`` for BERT.
    manifest: also write a ``SHA256SUMS`` manifest.
    initial_adapters: for a PiSSA/OLoRA adapter, its values at init (required for those, refused otherwise).

  Returns:
    The ``adapter_config.json`` contents.

  Raises:
    JloraError: an adapter that PEFT cannot represent (a variant outside PEFT's LoRA, a kernel that is not a
      Linear/Conv1D/Embedding weight, GPT-2's tied ``wte``, DoRA on a tied embedding, a PiSSA/OLoRA adapter
      without its ``initial_adapters``), or shapes that do not fit ``model``.
  """
  if config.variant in ("vera", "adalora"):  # PEFT types with files of their own: jlora.peft._formats
    from jlora.peft._formats import save_other

    return save_other(path, adapters, config, model, params=params, base_model_name_or_path=base_model_name_or_path,
                      task_type=task_type, manifest=manifest, initial_adapters=initial_adapters)
  table = module_table(model.config)
  shapes = param_shapes(model)
  if config.variant != "lora":
    raise JloraError(f"jlora.peft.save_pretrained writes PEFT LoRA adapters (and DoRA); variant={config.variant!r} "
                     "has no PEFT LoRA form.")
  if config.rewrites_base:
    if initial_adapters is None:
      raise JloraError(f"An init={config.init!r} adapter trains on the residual base W - s*A0@B0, which PEFT cannot "
                       "load; pass initial_adapters= (the adapters as init_with_base returned them) to write the "
                       "rank-2r LoRA that applies to the original base (PEFT's "
                       "path_initial_model_for_weight_conversion).")
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    targets = Lora(model, config).trace(abstract, jnp.zeros((1, 1), jnp.int32))
    adapters, config = to_plain_lora(adapters, initial_adapters, config, targets)
  elif initial_adapters is not None:
    raise JloraError(f"initial_adapters= converts PiSSA/OLoRA adapters; this one has init={config.init!r} and "
                     "applies to the original base as it is.")
  nodes = _adapter_nodes(adapters, config)
  if not nodes:
    raise JloraError("The adapter tree is empty: nothing to export.")
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  conv1d = False
  for kernel_path, node in nodes.items():
    if kernel_path not in shapes:
      raise JloraError(f"Adapter at '{kernel_path}' has no parameter in {type(model).__name__}.")
    if not config.matches(kernel_path):
      raise JloraError(f"Adapter at '{kernel_path}' is not a target of the given LoraConfig {config.target_rules}.")
    modules = _layer_modules(table, kernel_path, shapes[kernel_path])
    rank, alpha = config.rank_for(kernel_path), config.alpha_for(kernel_path)
    stack = shapes[kernel_path][:1] if modules[0].layer is not None else ()
    fan_in, fan_out = shapes[kernel_path][-2:]
    a, b = to_host(node["lora_a"]), to_host(node["lora_b"])
    if a.shape != stack + (fan_in, rank) or b.shape != stack + (rank, fan_out):
      raise JloraError(f"Adapter at '{kernel_path}' has lora_a {a.shape} and lora_b {b.shape}; rank {rank} on kernel "
                       f"{shapes[kernel_path]} needs {stack + (fan_in, rank)} and {stack + (rank, fan_out)}.")
    m = to_host(node["lora_magnitude"]) if config.use_dora else None
    if m is not None and m.shape != stack + (fan_out,):
      raise JloraError(f"Adapter at '{kernel_path}' has lora_magnitude {m.shape}; the kernel {shapes[kernel_path]} "
                       f"needs {stack + (fan_out,)}.")
    if any(v.dtype.name not in _DTYPES for v in (a, b) + ((m,) if m is not None else ())):
      raise JloraError(f"Adapter at '{kernel_path}' is {a.dtype.name}/{b.dtype.name}; PEFT export writes float16, "
                       "bfloat16 or float32.")
    for module in modules:
      a_i, b_i = (a[module.layer], b[module.layer]) if module.layer is not None else (a, b)
      key = PREFIX + module.name
      if module.kind == "embedding":
        tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a_i.T, b_i.T
      else:
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a_i.T, b_i.T
      if m is not None:
        tensors[f"{key}.lora_magnitude_vector"] = m[module.layer] if module.layer is not None else m
      ranks[module.name], alphas[module.name] = rank, alpha
      conv1d |= module.kind == "conv1d"

  adapted = sorted(ranks)
  tie = table.tied and table.input_embedding in ranks
  if tie and table.input_embedding.rsplit(".", 1)[-1] not in EMBEDDING_LAYER_NAMES:
    raise JloraError(f"'{table.input_embedding}' is tied to the LM head, and jlora's adapter on it acts on both. "
                     "PEFT ties LoRA weights only for embeddings named embed_tokens (ensure_weight_tying), so it "
                     "would adapt the lookup alone. Export the merged model instead (jlora.peft.save_merged).")
  target_modules = target_modules_for(adapted, table)
  if tie and config.use_dora:
    raise JloraError(f"'{table.input_embedding}' is tied to the LM head, where jlora's DoRA scales the query's "
                     "features; PEFT's tied LM head would be a Linear DoRA with a magnitude per vocabulary row. Export "
                     "the merged model instead (jlora.peft.save_merged).")
  if tie:
    # What PEFT itself saves after tying: the embedding is also listed by its full name, and the LM head
    # carries the embedding's factors transposed (lora_A = B_emb^T, lora_B = A_emb^T).
    target_modules = sorted({*target_modules, table.input_embedding})
    key = PREFIX + table.input_embedding
    tensors[PREFIX + "lm_head.lora_A.weight"] = tensors[f"{key}.lora_embedding_B"].T
    tensors[PREFIX + "lm_head.lora_B.weight"] = tensors[f"{key}.lora_embedding_A"].T
    ranks["lm_head"], alphas["lm_head"] = ranks[table.input_embedding], alphas[table.input_embedding]

  metadata = {"format": "pt"}
  if params is not None:
    metadata[METADATA_KEY] = base_fingerprint(model, params)
    if any(entry in EMBEDDING_LAYER_NAMES for entry in target_modules):  # PEFT's save_embedding_layers="auto"
      for name in (table.input_embedding, "lm_head"):
        if name in ranks:
          module = table.by_name[table.input_embedding] if name == "lm_head" and tie else table.by_name[name]
          kernel = to_host(_paths.get(params, tuple(module.path.split("/"))))
          tensors[f"{PREFIX}{name}.base_layer.weight"] = _hf_weight(module, kernel)

  hf = config_to_hf(model.config)
  if task_type == "auto":
    task_type = default_task_type(model)
  peft_config: dict[str, Any] = {
      "alpha_pattern": {key: _number(value) for key, value in pattern_for(alphas, config.alpha).items()},
      "auto_mapping": None if task_type is not None else {
          "base_model_class": hf["architectures"][0],
          "parent_library": f"transformers.models.{hf['model_type']}.modeling_{hf['model_type']}",
      },
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "exclude_modules": None,
      "fan_in_fan_out": conv1d,
      "inference_mode": True,
      "init_lora_weights": True if config.init == "kaiming_uniform" else "gaussian",
      "layers_pattern": None,
      "layers_to_transform": None,
      "lora_alpha": _number(config.alpha),
      "lora_dropout": float(config.dropout),
      "modules_to_save": None,
      "peft_type": "LORA",
      "r": config.rank,
      "rank_pattern": pattern_for(ranks, config.rank),
      "revision": None,
      "target_modules": target_modules,
      "task_type": task_type,
      "use_dora": bool(config.use_dora),
      "use_rslora": bool(config.use_rslora),
  }
  if tie:
    peft_config["ensure_weight_tying"] = True
  if config.invocation_tokens is not None:  # activated LoRA (PEFT's ALoraLinearVariant)
    peft_config["alora_invocation_tokens"] = list(config.invocation_tokens)

  write_adapter_dir(path, tensors, metadata, peft_config, manifest)
  return peft_config


def write_adapter_dir(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], peft_config: dict,
                      manifest: bool) -> None:
  """Writes a PEFT adapter directory (weights, config, optional SHA256SUMS) into ``path``, which must not hold one."""
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  stale = [name for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST) if (directory / name).exists()]
  if stale:
    raise JloraError(f"{directory} already holds {stale}; write the adapter into a fresh directory.")
  write_safetensors(directory / WEIGHTS_FILE, tensors, metadata)
  (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
  if manifest:
    write_manifest(directory)



def write_safetensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  """A deterministic safetensors file: names and metadata sorted, header padded to 8 bytes."""
  header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
  chunks, offset = [], 0
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    data = array.tobytes()  # little-endian hosts (x86, ARM), as safetensors requires
    header[name] = {"dtype": _DTYPES[array.dtype.name], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for data in chunks:
      f.write(data)
