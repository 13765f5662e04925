"""``from_pretrained``: a Hugging Face PEFT LoRA (or DoRA) adapter directory, checked, as a jlora adapter tree."""

import hashlib
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import Lora
from jlora._safety import (
  LoadPolicy,
  UnsafeAdapterError,
  check_base_fingerprint,
  enforce_norms,
  norm_report,
  read_safetensors,
  refuse_pickle_name,
  verify_manifest,
)
from jlora._safety._files import parse_json, read_bytes
from jlora._safety._regex import check_regex
from jlora._safety._trees import to_host
from jlora.models._hf_configs import config_to_hf
from jlora.peft._export import CONFIG_FILE, PREFIX, WEIGHTS_FILE
from jlora.peft._fingerprint import METADATA_KEY, base_fingerprint
from jlora.peft._matching import EMBEDDING_LAYER_NAMES, pattern_value, peft_targets
from jlora.peft._modules import ADAPTABLE, HfModule, ModuleTable, module_table

# peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the supported model types.
_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                    "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
# Fields that change nothing jlora computes (bookkeeping, training-time init, or handled below).
_KNOWN = {
    "peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
    "exclude_modules", "layers_to_transform", "layers_pattern", "ensure_weight_tying", "fan_in_fan_out",
    "init_lora_weights", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
    "peft_version", "bias", "use_dora", "modules_to_save", "lora_bias", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size", "runtime_config", "alora_invocation_tokens",
}
# PEFT types with a file format of their own (jlora.peft._formats): VeRA, AdaLoRA.
OTHER_TYPES = ("VERA", "ADALORA")
# Initialisations that rewrite the base weights: the adapter is only valid on that modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _fail(path: pathlib.Path, message: str) -> UnsafeAdapterError:
  return UnsafeAdapterError(f"PEFT adapter {path}: {message}")


def _check_config(raw: Any, where: pathlib.Path, model_type: str) -> dict[str, Any]:
  if not isinstance(raw, dict):
    raise _fail(where, f"{CONFIG_FILE} is not a JSON object.")
  if raw.get("peft_type") != "LORA":
    raise _fail(where, f"peft_type is {raw.get('peft_type')!r}; only 'LORA' adapters are supported.")
  for key, value in raw.items():
    if key not in _KNOWN and value not in (None, False, {}, [], ""):
      raise _fail(where, f"{CONFIG_FILE} sets {key}={value!r}, which jlora does not implement; it may change the "
                         "adapter's computation, so the adapter is refused.")
  if not isinstance(raw.get("use_dora", False), bool):
    raise _fail(where, f"use_dora={raw['use_dora']!r} must be true or false.")
  unsupported = {"lora_bias": False, "modules_to_save": None, "bias": "none"}
  for key, default in unsupported.items():
    if raw.get(key, default) not in (default, None, False, [], "none"):
      raise _fail(where, f"{key}={raw[key]!r} is not supported (jlora loads LoRA and DoRA: no biases or "
                         "fully trained modules).")
  init = raw.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise _fail(where, f"init_lora_weights={init!r} rewrites the base weights, so this adapter is only valid on "
                       "that modified base; convert it with PEFT (path_initial_model_for_weight_conversion) first.")
  config = dict(raw)
  if config.get("target_modules") is None:
    config["target_modules"] = _DEFAULT_TARGETS[model_type]
  checks = [
      ("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int"),
      ("lora_alpha", lambda v: _is_number(v), "a finite number"),
      ("target_modules", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
       "a regex or a list of module names"),
      ("rank_pattern", lambda v: isinstance(v, dict) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                                             for r in v.values()), "{regex: positive int}"),
      ("alpha_pattern", lambda v: isinstance(v, dict) and all(_is_number(a) for a in v.values()), "{regex: number}"),
      ("use_rslora", lambda v: isinstance(v, bool), "a bool"),
      ("lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
  ]
  defaults = {"rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "lora_dropout": 0.0}
  for key, ok, what in checks:
    value = config.get(key, defaults.get(key))
    if key not in config and key not in defaults or not ok(value):
      raise _fail(where, f"{key}={value!r} in {CONFIG_FILE} must be {what}.")
    config[key] = value
  for key in ("rank_pattern", "alpha_pattern"):
    for rule in config[key]:
      check_regex(rule, f"{where / CONFIG_FILE}: {key}")
  tokens = config.get("alora_invocation_tokens")
  if tokens is not None and not (isinstance(tokens, list) and tokens and all(_is_index(t) and t >= 0 for t in tokens)):
    raise _fail(where, f"alora_invocation_tokens={tokens!r} must be a non-empty list of token ids.")
  if tokens and config.get("use_dora"):
    raise _fail(where, "sets both alora_invocation_tokens and use_dora; PEFT has no activated DoRA.")
  for key in ("target_modules", "exclude_modules"):
    if isinstance(config.get(key), str):
      check_regex(config[key], f"{where / CONFIG_FILE}: {key}")
    elif config.get(key) is not None and not (isinstance(config[key], list)
                                              and all(isinstance(t, str) for t in config[key])):
      raise _fail(where, f"{key}={config[key]!r} must be a regex or a list of module names.")
  patterns = config.get("layers_pattern")
  if patterns is not None and not (isinstance(patterns, str) or isinstance(patterns, list)
                                   and all(isinstance(p, str) for p in patterns)):
    raise _fail(where, f"layers_pattern={patterns!r} must be a regex or a list of regexes.")
  for rule in [patterns] if isinstance(patterns, str) else patterns or []:
    check_regex(rule, f"{where / CONFIG_FILE}: layers_pattern")
  layers = config.get("layers_to_transform")
  if layers is not None and not (_is_index(layers) or isinstance(layers, list) and all(map(_is_index, layers))):
    raise _fail(where, f"layers_to_transform={layers!r} must be an int or a list of ints.")
  return config


def _is_index(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _embedding_in_target(targets: Any) -> bool:
  if isinstance(targets, str):
    return any(re.fullmatch(targets, name) for name in EMBEDDING_LAYER_NAMES)
  return any(t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in targets)


def _targeted(config: dict, table: ModuleTable, where: pathlib.Path) -> tuple[list[HfModule], bool]:
  """The adapted modules (as PEFT chooses them) and whether the LM head carries the tied embedding LoRA."""
  names = peft_targets(config, table)
  tie = False
  if table.tied and config.get("ensure_weight_tying") and _embedding_in_target(config["target_modules"]):
    names = [name for name in names if name != "lm_head"]
    names = names if table.input_embedding in names else [*names, table.input_embedding]
    tie = True
  modules = [table.by_name[name] for name in names]
  wrong = [f"{m.name} ({m.kind})" for m in modules if m.kind not in ADAPTABLE and m.kind != "tied_head"]
  if wrong:
    raise _fail(where, f"target_modules selects modules that are not Linear/Conv1D/Embedding layers: {wrong[:8]} "
                       "(PEFT refuses them too).")
  if any(m.kind == "tied_head" for m in modules):
    raise _fail(where, "targets lm_head, which shares its matrix with the input embedding, without PEFT's weight "
                       "tying; jlora has no separate LM head to put that adapter on.")
  if table.tied and table.input_embedding in names and not tie:
    raise _fail(where, f"adapts the tied embedding '{table.input_embedding}' for the lookup only (no "
                       "ensure_weight_tying); in jlora the embedding's adapter also acts on the LM head, so the "
                       "adapter would compute something else.")
  if not modules:
    raise _fail(where, f"target_modules={config['target_modules']!r} matches no module of this model.")
  return modules, tie


def _hf_shape(module: HfModule, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  return kernel_shape[::-1] if module.kind == "linear" else kernel_shape


def _expected(modules: list[HfModule], tie: bool, table: ModuleTable, params: Mapping, ranks: Mapping[str, int],
              dora: bool) -> tuple[dict[str, tuple], dict[str, tuple]]:
  expected, optional = {}, {}
  for module in modules:
    leaf = _paths.get(params, tuple(module.path.split("/")))
    shape = tuple(leaf.shape[1:] if module.layer is not None else leaf.shape)
    (fan_in, fan_out), rank, key = shape, ranks[module.name], PREFIX + module.name
    if module.kind == "embedding":
      expected[f"{key}.lora_embedding_A"], expected[f"{key}.lora_embedding_B"] = (rank, fan_in), (fan_out, rank)
    else:
      expected[f"{key}.lora_A.weight"], expected[f"{key}.lora_B.weight"] = (rank, fan_in), (fan_out, rank)
    if dora:  # DoRA's magnitude: one per output feature (an embedding's features)
      expected[f"{key}.lora_magnitude_vector"] = (fan_out,)
    optional[f"{key}.base_layer.weight"] = _hf_shape(module, shape)
    if tie and module.name == table.input_embedding:
      expected[PREFIX + "lm_head.lora_A.weight"], expected[PREFIX + "lm_head.lora_B.weight"] = (rank, fan_out), (
          fan_in, rank)
      optional[PREFIX + "lm_head.base_layer.weight"] = shape
  return expected, optional


def _check_base_layers(tensors: Mapping[str, np.ndarray], modules: list[HfModule], tie: bool, table: ModuleTable,
                       params: Mapping, where: pathlib.Path) -> None:
  owners = {PREFIX + m.name + ".base_layer.weight": m for m in modules}
  if tie:
    owners[PREFIX + "lm_head.base_layer.weight"] = table.by_name[table.input_embedding]
  for key, module in owners.items():
    if key not in tensors:
      continue
    leaf = _paths.get(params, tuple(module.path.split("/")))
    kernel = to_host(leaf[module.layer] if module.layer is not None else leaf)
    base = kernel.T if module.kind == "linear" else kernel  # a tied head's owner is the embedding: as is
    stored = tensors[key]
    if not np.array_equal(stored.astype(np.float32), base.astype(stored.dtype).astype(np.float32)):
      raise _fail(where, f"{key} (a copy of the base weight that PEFT stores with embedding adapters) differs from "
                         "this base model's weight: the adapter was trained with resized or fine-tuned embeddings, "
                         "or for another base.")


def _check_tie(tensors: Mapping[str, np.ndarray], table: ModuleTable, where: pathlib.Path) -> None:
  key = PREFIX + table.input_embedding
  if not (np.array_equal(tensors[PREFIX + "lm_head.lora_A.weight"], tensors[f"{key}.lora_embedding_B"].T)
          and np.array_equal(tensors[PREFIX + "lm_head.lora_B.weight"], tensors[f"{key}.lora_embedding_A"].T)):
    raise _fail(where, "lm_head's LoRA factors are not the tied embedding's (transposed), although the config ties "
                       "them (ensure_weight_tying).")


def _one_value(where: pathlib.Path, path: str, modules: list[HfModule], values: Mapping[str, Any], what: str) -> Any:
  found = {values[m.name] for m in modules}
  if len(found) > 1:
    raise _fail(where, f"the layers of the stacked kernel '{path}' have different {what}s {sorted(found)}; a stacked "
                       "adapter has one. Load the base with scan_layers=False.")
  return found.pop()


def read_directory(path: str | os.PathLike, policy: LoadPolicy) -> tuple[pathlib.Path, pathlib.Path, dict, Any]:
  """``(directory, weights file, manifest digests, parsed adapter_config.json)`` after the file checks."""
  directory = pathlib.Path(path)
  if not directory.is_dir():
    if directory.exists():
      refuse_pickle_name(directory)
    raise UnsafeAdapterError(f"{directory} is not a directory; pass the PEFT adapter directory.")
  weights = directory / WEIGHTS_FILE
  if not weights.exists():
    pickled = sorted(p.name for p in directory.iterdir() if p.name.startswith("adapter_model"))
    raise _fail(directory, f"no {WEIGHTS_FILE}" + (f"; {pickled} are pickled checkpoints, which jlora never "
                                                   "unpickles (re-save with safe_serialization=True)" if pickled else "")
                + ".")
  digests = verify_manifest(directory, covering=(CONFIG_FILE, WEIGHTS_FILE), policy=policy)
  config_bytes = read_bytes(directory / CONFIG_FILE, policy.max_json_bytes, "PEFT adapter config")
  if digests and hashlib.sha256(config_bytes).hexdigest() != digests[CONFIG_FILE]:
    raise _fail(directory, f"{CONFIG_FILE} changed after the manifest was checked.")
  return directory, weights, digests, parse_json(config_bytes, str(directory / CONFIG_FILE))


def from_pretrained(path: str | os.PathLike, model, params: Mapping, *example_inputs: Any,
                    policy: LoadPolicy | None = None, expected_fingerprint: str | None = None,
                    expected_base_model: str | None = None) -> tuple[dict, LoraConfig]:
  """Loads a PEFT LoRA adapter directory as a jlora adapter tree and LoraConfig, refusing anything unsafe.

  PEFT's own matching rules (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
  ``rank_pattern``/``alpha_pattern``, ``ensure_weight_tying``) decide which modules are adapted with
  which rank and alpha; the file must then hold exactly those tensors with exactly those shapes
  (PEFT itself only warns). Per-layer factors are stacked for ``nn.scan`` models. The returned config
  lists the adapted kernel paths literally, so it reproduces PEFT's choice exactly.

  Checks (each failure is a ``jlora.UnsafeAdapterError``): safetensors only, never pickle; the file
  and header size caps of ``policy``; header well-formed; dtypes float16/bfloat16/float32; exact key
  set and shapes; finite values; the ``SHA256SUMS`` manifest when present (or required); the stored
  base fingerprint against ``params`` (a file without one, such as PEFT's own files, is refused unless
  ``policy.allow_missing_fingerprint``); ``expected_fingerprint`` and
  ``expected_base_model`` when given; PEFT features jlora does not compute (biases, ``modules_to_save``,
  base-changing inits such as unconverted PiSSA/OLoRA, DoRA on a tied embedding) refused; and the
  update-norm report of the adapter's variant (warns, or refuses with ``LoadPolicy(strict=True)``).
  DoRA adapters (``use_dora``) load with their ``lora_magnitude_vector``s as ``lora_magnitude``; AdaLoRA
  adapters (``peft_type`` ADALORA) with their ``lora_E``, at the ranks of their ``rank_pattern``. A VeRA adapter
  comes with its projections, frozen state for the params: load it with ``from_pretrained_with_base``.

  Args:
    path: the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    model: the ``jlora.models`` module of the base.
    params: the base params (stacked or unrolled, as ``model.config.scan_layers`` says).
    *example_inputs: inputs for tracing ``model`` (default: one token).
    policy: size caps, manifest requirement, norm strictness, and whether a file without a stored
      base fingerprint may load (``LoadPolicy(allow_missing_fingerprint=True)``: genuine PEFT files).
    expected_fingerprint: require the file's stored base fingerprint to be this (even with the
      allowance).
    expected_base_model: require ``base_model_name_or_path`` in the config to be this.

  Returns:
    ``(adapters, config)``: use them as ``jlora.Lora(model, config).apply(params, adapters, ...)``.
  """
  policy = policy or LoadPolicy()
  directory, weights, digests, raw = read_directory(path, policy)
  if isinstance(raw, dict) and raw.get("peft_type") in OTHER_TYPES:  # VeRA, AdaLoRA: jlora.peft._formats
    from jlora.peft._formats import load_other

    return load_other(directory, weights, digests, raw, model, params, example_inputs, policy, expected_fingerprint,
                      expected_base_model, with_base=False)
  model_type = config_to_hf(model.config)["model_type"]
  config = _check_config(raw, directory, model_type)
  if expected_base_model is not None and config.get("base_model_name_or_path") != expected_base_model:
    raise _fail(directory, f"base_model_name_or_path is {config.get('base_model_name_or_path')!r}, expected "
                           f"{expected_base_model!r}.")

  table = module_table(model.config)
  modules, tie = _targeted(config, table, directory)
  ranks = {m.name: pattern_value(config["rank_pattern"], m.name, config["r"]) for m in modules}
  alphas = {m.name: float(pattern_value(config["alpha_pattern"], m.name, config["lora_alpha"])) for m in modules}
  if tie and (pattern_value(config["rank_pattern"], "lm_head", config["r"]) != ranks[table.input_embedding]
              or float(pattern_value(config["alpha_pattern"], "lm_head", config["lora_alpha"]))
              != alphas[table.input_embedding]):
    raise _fail(directory, "the tied lm_head gets another rank or alpha than the embedding it is tied to.")
  dora = bool(config.get("use_dora", False))
  if tie and dora:
    raise _fail(directory, f"is a DoRA adapter on the tied embedding '{table.input_embedding}'; PEFT's tied LM head is "
                           "a Linear DoRA with a magnitude per vocabulary row, while jlora's embedding DoRA scales the "
                           "LM head's input features, so the adapter would compute something else.")
  if config.get("alora_invocation_tokens") and any(m.kind == "embedding" for m in modules):
    raise _fail(directory, "is an activated LoRA (alora_invocation_tokens) on an embedding; PEFT's aLoRA adapts Linear "
                           "layers only.")
  expected, optional = _expected(modules, tie, table, params, ranks, dora)
  file = read_safetensors(weights, policy, expected=expected, optional=optional, sha256=digests.get(WEIGHTS_FILE))
  if file.metadata.get("format", "pt") != "pt":
    raise _fail(directory, f"{WEIGHTS_FILE} has format {file.metadata['format']!r}, expected 'pt' (PEFT's).")
  stored = file.metadata.get(METADATA_KEY)
  if expected_fingerprint is not None and stored != expected_fingerprint:
    raise _fail(directory, f"stores base fingerprint {stored!r}, expected {expected_fingerprint!r}.")
  check_base_fingerprint(stored, base_fingerprint(model, params), policy, f"PEFT adapter {directory}",
                         f"no {METADATA_KEY!r} in the __metadata__ of {WEIGHTS_FILE}",
                         "Hugging Face PEFT's own save_pretrained writes none (jlora.peft.save_pretrained writes "
                         "one when given params=), so a genuine PEFT adapter needs the allowance. ")
  tensors = file.tensors
  _check_base_layers(tensors, modules, tie, table, params, directory)
  if tie:
    _check_tie(tensors, table, directory)

  dtypes = {tensor.dtype for key, tensor in tensors.items() if ".base_layer." not in key}
  dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
  by_path: dict[str, list[HfModule]] = {}
  for module in modules:
    by_path.setdefault(module.path, []).append(module)
  adapters, rank_of, alpha_of = {}, {}, {}
  for kernel_path, group in by_path.items():
    stacked = group[0].layer is not None
    if stacked and sorted(m.layer for m in group) != list(range(table.num_layers)):
      raise _fail(directory, f"adapts only layers {sorted(m.layer for m in group)} of the stacked kernel "
                             f"'{kernel_path}'; load the base with scan_layers=False to use it.")
    rank_of[kernel_path] = _one_value(directory, kernel_path, group, ranks, "rank")
    alpha_of[kernel_path] = _one_value(directory, kernel_path, group, alphas, "alpha")
    group = sorted(group, key=lambda m: m.layer or 0)
    leaves = []
    for module in group:
      key = PREFIX + module.name
      a, b = ((tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"]) if module.kind == "embedding"
              else (tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]))
      leaf = {"lora_a": a.T.astype(dtype), "lora_b": b.T.astype(dtype)}
      if dora:
        leaf["lora_magnitude"] = tensors[f"{key}.lora_magnitude_vector"].astype(dtype)
      leaves.append(leaf)
    adapters[tuple(kernel_path.split("/"))] = {
        name: jnp.asarray(np.stack([leaf[name] for leaf in leaves]) if stacked else leaves[0][name])
        for name in leaves[0]}

  init = config.get("init_lora_weights", True)
  lora_config = LoraConfig(
      targets=[re.escape(p) for p in by_path],
      rank=config["r"],
      alpha=float(config["lora_alpha"]),
      dropout=float(config["lora_dropout"]),
      use_rslora=config["use_rslora"],
      rank_pattern={re.escape(p): r for p, r in rank_of.items() if r != config["r"]},
      alpha_pattern={re.escape(p): a for p, a in alpha_of.items() if a != float(config["lora_alpha"])},
      init="gaussian" if init == "gaussian" else "kaiming_uniform",
      dtype=dtype,
      use_dora=dora,
      invocation_tokens=config.get("alora_invocation_tokens") or None,
  )
  adapters = _paths.nest(adapters)
  lora = Lora(model, lora_config)
  targets = lora.trace(params, *(example_inputs or (jnp.zeros((1, 1), jnp.int32),)))
  if set(targets) != set(by_path):  # the config above lists exactly these paths, so this is a jlora bug
    raise JloraError(f"jlora.peft: traced targets {sorted(targets)} differ from the adapter's {sorted(by_path)}.")
  enforce_norms(norm_report(lora, params, adapters, policy), policy, str(directory))
  return adapters, lora_config
