"""The PEFT types with a file format of their own (VeRA, AdaLoRA): dispatch, and what their readers share.

``jlora.peft.save_pretrained`` / ``from_pretrained`` hand these adapters here; ``from_pretrained_with_base``
returns the params too, which a VeRA adapter extends with the projections its file stores.
"""

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jlora._errors import JloraError
from jlora._safety import (
  LoadPolicy,
  UnsafeAdapterError,
  check_base_fingerprint,
  read_safetensors,
)
from jlora._variant import split_state
from jlora.peft._export import WEIGHTS_FILE
from jlora.peft._fingerprint import METADATA_KEY, base_fingerprint
from jlora.peft._import import _fail, _targeted, from_pretrained, read_directory
from jlora.peft._modules import HfModule, ModuleTable, module_table


def from_pretrained_with_base(path: str | os.PathLike, model, params: Mapping, *example_inputs: Any,
                              policy: LoadPolicy | None = None, expected_fingerprint: str | None = None,
                              expected_base_model: str | None = None) -> tuple[dict, dict, Any]:
  """``jlora.peft.from_pretrained`` for every PEFT type, with the params the adapter belongs to: ``(params',
  adapters, config)``.

  ``params'`` is ``params`` unless the adapter carries frozen state: a VeRA adapter (``peft_type`` VERA) adds
  the projections stored in its file (``base_model.vera_A``/``vera_B``, transposed to jlora's ``(in, r)`` and
  ``(r, out)``) as ``params'["jlora:state"]["vera"]``; JAX cannot replay torch's generator, so only files saved
  with ``save_projection=True`` (PEFT's default) load. The caller's tree is not modified. Same checks, arguments
  and config as ``from_pretrained``.

  Returns:
    ``(params', adapters, config)``: use them as ``jlora.Lora(model, config).apply(params', adapters, ...)``.
  """
  policy = policy or LoadPolicy()
  directory, weights, digests, raw = read_directory(path, policy)
  if isinstance(raw, dict) and raw.get("peft_type") in ("VERA", "ADALORA"):
    return load_other(directory, weights, digests, raw, model, params, example_inputs, policy, expected_fingerprint,
                      expected_base_model, with_base=True)
  adapters, config = from_pretrained(path, model, params, *example_inputs, policy=policy,
                                     expected_fingerprint=expected_fingerprint, expected_base_model=expected_base_model)
  return params, adapters, config


def load_other(directory: pathlib.Path, weights: pathlib.Path, digests: dict, raw: dict, model, params: Mapping,
               example_inputs: tuple, policy: LoadPolicy, expected_fingerprint: str | None,
               expected_base_model: str | None, *, with_base: bool):
  """Loads a VeRA or AdaLoRA directory: ``(params', adapters, config)`` with ``with_base``, else
  ``(adapters, config)`` (refused for VeRA, whose projections belong in the params)."""
  from jlora.peft._adalora import load_adalora
  from jlora.peft._vera import load_vera

  if raw["peft_type"] == "VERA" and not with_base:
    raise JloraError(f"{directory} is a VeRA adapter: its projections are frozen state that goes into the params; "
                     "load it with params, adapters, config = jlora.peft.from_pretrained_with_base(path, model, params).")
  if expected_base_model is not None and raw.get("base_model_name_or_path") != expected_base_model:
    raise _fail(directory, f"base_model_name_or_path is {raw.get('base_model_name_or_path')!r}, expected "
                           f"{expected_base_model!r}.")
  load = load_vera if raw["peft_type"] == "VERA" else load_adalora
  out_params, adapters, config = load(directory, weights, digests, raw, model, params, example_inputs, policy,
                                      expected_fingerprint)
  return (out_params, adapters, config) if with_base else (adapters, config)


def save_other(path, adapters: Mapping, config, model, **kwargs) -> dict:
  """``jlora.peft.save_pretrained`` of a VeRA or AdaLoRA adapter."""
  from jlora.peft._adalora import save_adalora
  from jlora.peft._vera import save_vera

  return (save_vera if config.variant == "vera" else save_adalora)(path, adapters, config, model, **kwargs)


def read_weights(directory: pathlib.Path, weights: pathlib.Path, digests: dict, model, params: Mapping,
                 policy: LoadPolicy, expected: Mapping[str, tuple], expected_fingerprint: str | None
                 ) -> tuple[dict[str, np.ndarray], np.dtype]:
  """The checked tensors of the weights file (exact keys and shapes, finite, manifest, base fingerprint) and the
  dtype the adapter loads in (the file's, when all its tensors share one; else float32)."""
  file = read_safetensors(weights, policy, expected=expected, optional={}, sha256=digests.get(WEIGHTS_FILE))
  if file.metadata.get("format", "pt") != "pt":
    raise _fail(directory, f"{WEIGHTS_FILE} has format {file.metadata['format']!r}, expected 'pt' (PEFT's).")
  stored = file.metadata.get(METADATA_KEY)
  if expected_fingerprint is not None and stored != expected_fingerprint:
    raise _fail(directory, f"stores base fingerprint {stored!r}, expected {expected_fingerprint!r}.")
  check_base_fingerprint(stored, base_fingerprint(model, split_state(params)[0]), policy, f"PEFT adapter {directory}",
                         f"no {METADATA_KEY!r} in the __metadata__ of {WEIGHTS_FILE}",
                         "Hugging Face PEFT's own save_pretrained writes none (jlora.peft.save_pretrained writes "
                         "one when given params=), so a genuine PEFT adapter needs the allowance. ")
  dtypes = {tensor.dtype for tensor in file.tensors.values()}
  return file.tensors, dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)


def by_kernel(modules: list[HfModule], table: ModuleTable, directory: pathlib.Path) -> dict[str, list[HfModule]]:
  """The adapted modules grouped by jlora kernel path, layers in order; a stacked kernel must have every layer."""
  groups: dict[str, list[HfModule]] = {}
  for module in modules:
    groups.setdefault(module.path, []).append(module)
  for kernel_path, group in groups.items():
    group.sort(key=lambda m: m.layer or 0)
    if group[0].layer is not None and [m.layer for m in group] != list(range(table.num_layers)):
      raise _fail(directory, f"adapts only layers {[m.layer for m in group]} of the stacked kernel '{kernel_path}'; "
                             "load the base with scan_layers=False to use it.")
  return groups


def escaped(paths) -> list[str]:
  return [re.escape(p) for p in paths]


def config_error(directory: pathlib.Path, error: JloraError) -> UnsafeAdapterError:
  return _fail(directory, f"its config does not make a valid jlora adapter: {error}")


def common_fields(model, task_type: str | None, base_model_name_or_path: str | None) -> dict[str, Any]:
  """The fields every PEFT config writes: task, base model, inference mode."""
  from jlora.models._hf_configs import config_to_hf
  from jlora.peft._export import default_task_type

  hf = config_to_hf(model.config)
  if task_type == "auto":
    task_type = default_task_type(model)
  return {
      "auto_mapping": None if task_type is not None else {
          "base_model_class": hf["architectures"][0],
          "parent_library": f"transformers.models.{hf['model_type']}.modeling_{hf['model_type']}",
      },
      "base_model_name_or_path": base_model_name_or_path,
      "inference_mode": True,
      "revision": None,
      "task_type": task_type,
  }


def adapted_modules(adapters: Mapping, config, model, what: str) -> tuple[dict[str, Mapping], dict, dict]:
  """``({kernel path: node}, {kernel path: [HfModule per layer]}, {kernel path: params shape})`` of an export,
  checked: every node a target of ``config`` on an ``nn.Linear``/``Conv1D`` weight."""
  from jlora.peft._export import _adapter_nodes, _layer_modules, param_shapes
  from jlora.peft._modules import module_table

  table = module_table(model.config)
  shapes = param_shapes(model)
  nodes = _adapter_nodes(adapters, config)
  if not nodes:
    raise JloraError("The adapter tree is empty: nothing to export.")
  modules = {}
  for kernel_path in nodes:
    if kernel_path not in shapes:
      raise JloraError(f"Adapter at '{kernel_path}' has no parameter in {type(model).__name__}.")
    if not config.matches(kernel_path):
      raise JloraError(f"Adapter at '{kernel_path}' is not a target of the given LoraConfig {config.target_rules}.")
    modules[kernel_path] = _layer_modules(table, kernel_path, shapes[kernel_path])
    wrong = [m.name for m in modules[kernel_path] if m.kind not in ("linear", "conv1d")]
    if wrong:
      raise JloraError(f"{what} adapts nn.Linear/Conv1D layers only (PEFT's too); '{kernel_path}' is {wrong[0]}.")
  return nodes, modules, shapes


def host_leaf(node: Mapping, name: str, shape: tuple, kernel_path: str) -> np.ndarray:
  """An adapter leaf on the host, checked against the shape the export needs and PEFT's dtypes."""
  from jlora._safety._trees import to_host
  from jlora.peft._export import _DTYPES

  value = to_host(node[name])
  if value.shape != shape:
    raise JloraError(f"Adapter at '{kernel_path}' has {name} {value.shape}; its kernel and config need {shape}.")
  if value.dtype.name not in _DTYPES:
    raise JloraError(f"Adapter at '{kernel_path}' has a {value.dtype.name} {name}; PEFT export writes float16, "
                     "bfloat16 or float32.")
  return value


def linear_targets(config: dict, model, directory: pathlib.Path, method: str) -> tuple[ModuleTable, list[HfModule]]:
  """The model's module table and the modules a VeRA or AdaLoRA ``config`` adapts (as PEFT chooses them); refused
  unless all are Linear/Conv1D, as PEFT's ``method`` refuses them."""
  table = module_table(model.config)
  modules, _ = _targeted(config, table, directory)
  wrong = [m.name for m in modules if m.kind not in ("linear", "conv1d")]
  if wrong:
    raise _fail(directory, f"targets {wrong[:8]}, which are not Linear/Conv1D layers: PEFT's {method} refuses them.")
  return table, modules
