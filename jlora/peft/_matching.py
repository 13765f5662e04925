"""PEFT's module-matching rules, reproduced, and the translation of jlora choices into them.

PEFT (``peft.tuners.tuners_utils.check_target_module_exists`` and ``peft.utils.other.get_pattern_key``):

* ``target_modules`` as a string is ``re.fullmatch``-ed against module names; as a list, a name is
  targeted when it equals an entry or ends with ``"." + entry``; ``"all-linear"`` means every
  ``nn.Linear``/``Conv1D`` except the output layer. ``exclude_modules`` works the same way, and
  ``layers_to_transform`` keeps list matches whose first numbered path segment is listed.
* ``rank_pattern`` / ``alpha_pattern`` keys are regexes; the first key (in dict order) with
  ``re.match(rf"(.*\\.)?({key})$", name)`` gives the module's value.

Export chooses, per module, the shortest dotted suffix of its name that matches no module it should
not (checked against every module name of the model), so the written config is exact by
construction, and checks the result by re-running these rules.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from jlora._errors import JloraError
from jlora.peft._modules import ModuleTable

V = TypeVar("V")
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES


def list_match(entries: Iterable[str], name: str) -> bool:
  return any(name == entry or name.endswith("." + entry) for entry in entries)


def pattern_key(keys: Iterable[str], name: str) -> str | None:
  """PEFT's ``get_pattern_key``: the first key that matches ``name`` as a module-name suffix regex."""
  for key in keys:
    if re.match(rf"(.*\.)?({key})$", name):
      return key
  return None


def pattern_value(pattern: Mapping[str, V], name: str, default: V) -> V:
  key = pattern_key(pattern, name)
  return pattern[key] if key is not None else default


def _layer_index(name: str, layers_pattern: Any) -> int | None:
  if not layers_pattern:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  else:
    match = None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
      if match is not None:
        break
  return int(match.group("idx")) if match else None


def peft_targets(config: Mapping[str, Any], table: ModuleTable) -> list[str]:
  """The module names a PEFT ``LoraConfig`` (as a dict) adapts on the model of ``table``."""
  targets = config.get("target_modules")
  exclude = config.get("exclude_modules")
  layers = config.get("layers_to_transform")
  if isinstance(targets, str) and targets.lower() == "all-linear":
    return [m.name for m in table.modules if m.kind in ("linear", "conv1d") and m.name != "lm_head"
            and not _excluded(exclude, m.name)]
  chosen = []
  for name in table.names:
    if _excluded(exclude, name):
      continue
    if isinstance(targets, str):
      found = re.fullmatch(targets, name) is not None
    else:
      found = list_match(targets, name)
      if found and layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(name, config.get("layers_pattern"))
        found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
    if found:
      chosen.append(name)
  return chosen


def _excluded(exclude: Any, name: str) -> bool:
  if not exclude:
    return False
  if isinstance(exclude, str):
    return re.fullmatch(exclude, name) is not None
  return list_match(exclude, name)


def _suffixes(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]


def target_modules_for(adapted: Iterable[str], table: ModuleTable) -> list[str]:
  """A ``target_modules`` list that selects exactly ``adapted`` among all of the model's modules."""
  adapted = set(adapted)
  entries: list[str] = []
  for name in sorted(adapted):
    if list_match(entries, name):
      continue
    for suffix in _suffixes(name):
      if all(other in adapted for other in table.names if list_match([suffix], other)):
        entries.append(suffix)
        break
  if set(peft_targets({"target_modules": entries}, table)) != adapted:  # cannot happen: full names always work
    raise JloraError(f"jlora.peft: no exact PEFT target_modules for {sorted(adapted)}.")
  return sorted(entries)


def pattern_for(values: Mapping[str, V], default: V) -> dict[str, V]:
  """A PEFT ``rank_pattern``/``alpha_pattern`` giving each module of ``values`` its value.

  Modules whose value is the default get no key, and every key matches only modules of one value,
  so PEFT's first-match order cannot matter.
  """
  special = {name: value for name, value in values.items() if value != default}
  pattern: dict[str, V] = {}
  for name in sorted(special):
    if pattern_key(pattern, name) is not None:
      continue
    for suffix in _suffixes(name):
      found = None
      for key in (suffix, re.escape(suffix)):
        matched = [other for other in values if re.match(rf"(.*\.)?({key})$", other)]
        if all(other in special and special[other] == special[name] for other in matched):
          found = key
          break
      if found is not None:
        pattern[found] = special[name]
        break
  if any(pattern_value(pattern, name, default) != value for name, value in values.items()):
    raise JloraError(f"jlora.peft: no exact PEFT pattern for {special}.")  # cannot happen: full names always work
  return pattern
