"""PEFT's AdaLoRA files: ``lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)``, ``lora_B`` ``(out, r)`` per module, each at
the rank its ``rank_pattern`` entry keeps.

PEFT's ``rank_pattern`` maps ``<module>.lora_E`` to one bool per initial triplet; the file holds the kept
triplets (``resize_state_dict_by_rank_pattern``), and loading builds every module at ``init_r`` and resizes it
to its pattern, keeping ``ranknum = init_r`` for the scale. In jlora a kernel has one rank: a stacked
(``nn.scan``) kernel whose layers keep different numbers of triplets gets the largest, the others padded with
zero triplets (``E = 0``: exactly no change). The export writes each module at its kernel's jlora rank
(``[True] * rank + [False] * (init_r - rank)``; a kernel at ``init_r`` gets no entry).
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import Lora
from jlora._safety import LoadPolicy, enforce_norms, norm_report
from jlora._variant import split_state
from jlora.models._hf_configs import config_to_hf
from jlora.peft._export import PREFIX, _number, write_adapter_dir
from jlora.peft._fingerprint import METADATA_KEY, base_fingerprint
from jlora.peft._formats import (
  adapted_modules,
  by_kernel,
  common_fields,
  config_error,
  escaped,
  host_leaf,
  linear_targets,
  read_weights,
)
from jlora.peft._import import _check_config, _fail, _is_number
from jlora.peft._matching import target_modules_for
from jlora.peft._modules import module_table

# AdaLoraConfig's fields beyond LoraConfig's (jlora's names in LoraConfig).
_ADALORA_KEYS = {"init_r": "init_rank", "target_r": "target_rank", "tinit": "tinit", "tfinal": "tfinal",
                 "deltaT": "delta_t", "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight",
                 "total_step": "total_step"}
# PEFT's LoraConfig default r, which AdaLoRA ignores (it warns when r is set to anything else).
_IGNORED_R = 8


def save_adalora(path, adapters: Mapping, config: LoraConfig, model, *, params: Mapping | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = "auto", manifest: bool = True,
                 initial_adapters: Mapping | None = None) -> dict[str, Any]:
  """Writes a jlora AdaLoRA adapter as PEFT's AdaLoRA directory (see ``jlora.peft.save_pretrained``)."""
  if initial_adapters is not None:
    raise JloraError("initial_adapters= converts PiSSA/OLoRA adapters; an AdaLoRA adapter is exported as it is.")
  nodes, modules, shapes = adapted_modules(adapters, config, model, "AdaLoRA")
  tensors: dict[str, np.ndarray] = {}
  rank_pattern: dict[str, list[bool]] = {}
  conv1d = False
  for kernel_path, node in nodes.items():
    rank = config.rank_for(kernel_path)
    stack = shapes[kernel_path][:1] if modules[kernel_path][0].layer is not None else ()
    fan_in, fan_out = shapes[kernel_path][-2:]
    a = host_leaf(node, "lora_a", stack + (fan_in, rank), kernel_path)
    e = host_leaf(node, "lora_e", stack + (rank,), kernel_path)
    b = host_leaf(node, "lora_b", stack + (rank, fan_out), kernel_path)
    for module in modules[kernel_path]:
      a_i, e_i, b_i = (v[module.layer] if module.layer is not None else v for v in (a, e, b))
      key = PREFIX + module.name
      tensors[f"{key}.lora_A"], tensors[f"{key}.lora_E"], tensors[f"{key}.lora_B"] = a_i.T, e_i[:, None], b_i.T
      if rank != config.init_rank:
        rank_pattern[f"{module.name}.lora_E"] = [True] * rank + [False] * (config.init_rank - rank)
      conv1d |= module.kind == "conv1d"
  adapted = [m.name for group in modules.values() for m in group]
  base = None if params is None else split_state(params)[0]
  peft_config = {
      **common_fields(model, task_type, base_model_name_or_path),
      "alpha_pattern": {},
      "beta1": float(config.beta1),
      "beta2": float(config.beta2),
      "bias": "none",
      "deltaT": config.delta_t,
      "exclude_modules": None,
      "fan_in_fan_out": conv1d,
      "init_lora_weights": True,
      "init_r": config.init_rank,
      "layers_pattern": None,
      "layers_to_transform": None,
      "lora_alpha": _number(config.alpha),
      "lora_dropout": float(config.dropout),
      "modules_to_save": None,
      "orth_reg_weight": float(config.orth_reg_weight),
      "peft_type": "ADALORA",
      "r": _IGNORED_R,
      "rank_pattern": rank_pattern or None,
      "target_modules": target_modules_for(adapted, module_table(model.config)),
      "target_r": config.target_rank,
      "tfinal": config.tfinal,
      "tinit": config.tinit,
      "total_step": config.total_step,
      "use_dora": False,
      "use_rslora": False,
  }
  metadata = {"format": "pt"}
  if base is not None:
    metadata[METADATA_KEY] = base_fingerprint(model, base)
  write_adapter_dir(path, tensors, metadata, peft_config, manifest)
  return peft_config


def _is_int(value: Any, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_adalora_config(raw: dict, where: pathlib.Path, model_type: str) -> dict[str, Any]:
  """PEFT's AdaLoraConfig, checked: its LoRA fields as the LoRA checks do it, then its own."""
  as_lora = {key: value for key, value in raw.items() if key not in _ADALORA_KEYS}
  as_lora.update(peft_type="LORA", rank_pattern={})
  config = _check_config(as_lora, where, model_type)
  for key, low in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1), ("total_step", 1)):
    if not _is_int(raw.get(key), low):
      raise _fail(where, f"{key}={raw.get(key)!r} must be an int >= {low}.")
  for key in ("beta1", "beta2", "orth_reg_weight"):
    if not _is_number(raw.get(key)):
      raise _fail(where, f"{key}={raw.get(key)!r} must be a finite number.")
  refused = {"use_dora": "AdaLoRA has no DoRA", "use_rslora": "PEFT's AdaLoRA ignores it",
             "alpha_pattern": "PEFT's AdaLoRA ignores it"}
  for key, why in refused.items():
    if config.get(key):
      raise _fail(where, f"sets {key}={config[key]!r}: {why}, and jlora does not load what it would ignore.")
  if config["lora_alpha"] <= 0:
    raise _fail(where, f"lora_alpha={config['lora_alpha']!r}: PEFT then scales each module by its pruned rank; only a "
                       "positive lora_alpha is supported.")
  pattern = raw.get("rank_pattern") or {}
  if not isinstance(pattern, dict) or not all(
      isinstance(k, str) and k.endswith(".lora_E") and isinstance(v, list) and len(v) == raw["init_r"]
      and all(isinstance(x, bool) for x in v) for k, v in pattern.items()):
    raise _fail(where, f"rank_pattern must map '<module>.lora_E' to {raw['init_r']} (init_r) booleans.")
  return {**config, **{key: raw[key] for key in _ADALORA_KEYS},
          "kept": {k[:-len(".lora_E")]: sum(v) for k, v in pattern.items()}}


def load_adalora(directory: pathlib.Path, weights: pathlib.Path, digests: dict, raw: dict, model, params: Mapping,
                 example_inputs: tuple, policy: LoadPolicy, expected_fingerprint: str | None
                 ) -> tuple[Mapping, dict, LoraConfig]:
  """A PEFT AdaLoRA directory as ``(params, adapters, LoraConfig(variant="adalora"))``, checked."""
  config = _check_adalora_config(raw, directory, config_to_hf(model.config)["model_type"])
  table, modules = linear_targets(config, model, directory, "AdaLoRA")
  names = {m.name for m in modules}
  stray = sorted(set(config["kept"]) - names)
  if stray:
    raise _fail(directory, f"rank_pattern names modules that are not adapted: {stray[:8]}.")
  init_r = config["init_r"]
  ranks = {m.name: config["kept"].get(m.name, init_r) for m in modules}
  base, _ = split_state(params)
  expected = {}
  for module in modules:
    leaf = base
    for key in module.path.split("/"):
      leaf = leaf[key]
    fan_in, fan_out = leaf.shape[-2:]
    key, rank = PREFIX + module.name, ranks[module.name]
    expected[f"{key}.lora_A"], expected[f"{key}.lora_E"], expected[f"{key}.lora_B"] = (
        (rank, fan_in), (rank, 1), (fan_out, rank))
  tensors, dtype = read_weights(directory, weights, digests, model, params, policy, expected, expected_fingerprint)

  adapters, rank_of = {}, {}
  groups = by_kernel(modules, table, directory)
  for kernel_path, group in groups.items():
    # One rank per kernel: the largest its layers keep (at least 1), the others padded with zero triplets.
    rank = max(1, max(ranks[m.name] for m in group))
    leaves = {"lora_a": [], "lora_e": [], "lora_b": []}
    for module in group:
      key, kept = PREFIX + module.name, ranks[module.name]
      a, e, b = (tensors[f"{key}.lora_{x}"].astype(dtype) for x in "AEB")
      leaves["lora_a"].append(np.pad(a.T, ((0, 0), (0, rank - kept))))
      leaves["lora_e"].append(np.pad(e[:, 0], (0, rank - kept)))
      leaves["lora_b"].append(np.pad(b.T, ((0, rank - kept), (0, 0))))
    stacked = group[0].layer is not None
    adapters[tuple(kernel_path.split("/"))] = {name: jnp.asarray(np.stack(v) if stacked else v[0])
                                               for name, v in leaves.items()}
    rank_of[kernel_path] = rank
  try:
    lora_config = LoraConfig(
        targets=escaped(groups), alpha=float(config["lora_alpha"]), dropout=float(config["lora_dropout"]),
        rank_pattern={pattern: rank for pattern, rank in zip(escaped(rank_of), rank_of.values()) if rank != init_r},
        dtype=dtype, variant="adalora", **{jlora_key: config[key] for key, jlora_key in _ADALORA_KEYS.items()})
  except JloraError as e:
    raise config_error(directory, e) from None
  adapters = _paths.nest(adapters)
  lora = Lora(model, lora_config)
  targets = lora.trace(base, *(example_inputs or (jnp.zeros((1, 1), jnp.int32),)))
  if set(targets) != set(groups):  # the config lists exactly these paths, so this is a jlora bug
    raise JloraError(f"jlora.peft: traced targets {sorted(targets)} differ from the adapter's {sorted(groups)}.")
  enforce_norms(norm_report(lora, params, adapters, policy), policy, str(directory))
  return params, adapters, lora_config
