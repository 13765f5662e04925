"""The Hugging Face module names of a ``jlora.models`` architecture, read off its name map.

PEFT addresses adapters by module name (``model.layers.3.self_attn.q_proj``), jlora by kernel path
(``model/layers/self_attn/q_proj/kernel``, layer 3 of a stacked kernel). Both are derived from the
one per-architecture table in ``jlora.models._name_maps``: a rule whose tensor is a ``.weight`` and
whose leaf is a ``kernel`` is an ``nn.Linear`` (transposed) or GPT-2 ``Conv1D`` (not transposed); an
``embedding`` leaf is an ``nn.Embedding``.
"""

import dataclasses
import functools
from typing import Literal

from jlora.models._bert import BertConfig
from jlora.models._name_maps import name_map

Kind = Literal["linear", "conv1d", "embedding", "tied_head", "other"]
ADAPTABLE = ("linear", "conv1d", "embedding")


@dataclasses.dataclass(frozen=True)
class HfModule:
  """One module of the transformers model.

  Attributes:
    name: its ``named_modules()`` name, e.g. ``"model.layers.3.self_attn.q_proj"``.
    kind: ``"linear"`` (``nn.Linear``), ``"conv1d"`` (GPT-2's ``Conv1D``, PEFT's ``fan_in_fan_out``),
      ``"embedding"``, ``"tied_head"`` (an LM head that shares the input embedding's matrix and has no
      parameter of its own in jlora) or ``"other"`` (norms, containers).
    path: the jlora parameter path of its weight, e.g. ``"model/layers/self_attn/q_proj/kernel"``.
    layer: the index into the leading stacked axis of ``path`` (``nn.scan``), else None.
  """

  name: str
  kind: Kind
  path: str | None = None
  layer: int | None = None


@dataclasses.dataclass(frozen=True)
class ModuleTable:
  """Every module name PEFT would see for one model config, and the adaptable ones by jlora path."""

  modules: tuple[HfModule, ...]
  input_embedding: str
  scan: bool
  num_layers: int

  @functools.cached_property
  def by_name(self) -> dict[str, HfModule]:
    return {m.name: m for m in self.modules}

  @functools.cached_property
  def by_path(self) -> dict[tuple[str, int | None], HfModule]:
    return {(m.path, m.layer): m for m in self.modules if m.kind in ADAPTABLE}

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.modules)

  @property
  def tied(self) -> bool:
    return any(m.kind == "tied_head" for m in self.modules)


def _kind(hf_name: str, param_path: str, transpose: bool) -> Kind:
  if hf_name.endswith(".weight") and param_path.endswith("/embedding"):
    return "embedding"
  if hf_name.endswith(".weight") and param_path.endswith("/kernel"):
    return "linear" if transpose else "conv1d"
  return "other"


def module_table(config) -> ModuleTable:
  """The module table of a ``jlora.models`` config (``LlamaConfig``, ``GPT2Config``, ``BertConfig``)."""
  names = name_map(config)
  scan = config.scan_layers
  modules: dict[str, HfModule] = {}
  input_embedding = None
  for rule in names.rules:
    layers = range(names.num_layers) if rule.per_layer else [None]
    for i in layers:
      hf_name = rule.hf_name.format(i=i) if i is not None else rule.hf_name
      module_name = hf_name.rsplit(".", 1)[0]
      kind = _kind(rule.hf_name, rule.param_path, rule.transpose)
      if kind == "other":
        modules.setdefault(module_name, HfModule(module_name, "other"))
        continue
      stacked = scan and i is not None
      path = rule.param_path.replace("_{i}", "") if stacked else rule.param_path.format(i=i)
      modules[module_name] = HfModule(module_name, kind, path, i if stacked else None)
      if kind == "embedding" and input_embedding is None:
        input_embedding = module_name  # each name map lists the token embedding first
  if not isinstance(config, BertConfig) and config.tie_word_embeddings:
    modules["lm_head"] = HfModule("lm_head", "tied_head")
  for name in list(modules):
    parts = name.split(".")
    for k in range(1, len(parts)):
      modules.setdefault(".".join(parts[:k]), HfModule(".".join(parts[:k]), "other"))
  return ModuleTable(tuple(modules.values()), input_embedding, scan, names.num_layers)
