"""Finding the kernels a LoraConfig adapts, by tracing the unmodified model abstractly.

Tracing (``jax.eval_shape``, no FLOPs, no memory for activations) tells which module owns each
parameter, with which call signature, and how many stacked-layer axes ``nn.scan``/``nn.vmap`` add
to it. Axes are therefore known, not guessed from shapes.
"""

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._layout import KernelLayout
from jlora._linen_bindings import SUPPORTED, binding_for


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel.

  Attributes:
    path: '/'-joined path of the kernel in the params tree (also its path in the adapter tree).
    module_type: class name of the owning module.
    kind: the binding kind ("dense", "dense_general", "einsum", "conv", "embed").
    layout: the kernel's axis roles as the module sees it.
    stack_shape: leading axes the params tree has beyond the module's view (``nn.scan`` layers).
    rank: adapter rank.
    scale: ``alpha / rank`` (or ``alpha / sqrt(rank)``).
  """

  path: str
  module_type: str
  kind: str
  layout: KernelLayout
  stack_shape: tuple[int, ...]
  rank: int
  scale: float


@dataclasses.dataclass
class _Seen:
  module_type: str
  kind: str | None = None
  param: str | None = None
  layout: KernelLayout | None = None


def _record_calls(model: nn.Module, params: Any, args: tuple, kwargs: dict) -> dict[tuple[str, ...], _Seen]:
  seen: dict[tuple[str, ...], _Seen] = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    record = seen.setdefault(module.path, _Seen(type(module).__name__))
    binding = binding_for(module)
    if binding is not None and context.method_name in binding.methods and module.has_variable("params", binding.param):
      kernel = module.get_variable("params", binding.param)
      layout = binding.layout(module, context.method_name, call_args, call_kwargs, kernel.shape)
      if record.layout is not None and record.layout != layout:
        raise JloraError(f"{record.module_type} at '{'/'.join(module.path)}' is called with two different kernel "
                         f"layouts ({record.layout} and {layout}); one adapter cannot serve both.")
      record.kind, record.param, record.layout = binding.kind, binding.param, layout
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kwargs), params)
  return seen


def near_misses(rule: str, paths: list[str]) -> list[str]:
  partial = [p for p in paths if re.search(rule, p)]
  close = difflib.get_close_matches(rule, paths, n=5, cutoff=0.4)
  return list(dict.fromkeys(partial[:5] + close))[:8]


def find_targets(
    model: nn.Module, config: LoraConfig, params: Mapping, args: tuple, kwargs: dict
) -> dict[str, Target]:
  """Traces ``model.apply({"params": params}, *args, **kwargs)`` and returns the adapted kernels.

  Raises:
    JloraError: a target rule matches no parameter (near misses are listed), or matches a
      parameter jlora cannot adapt (not the kernel of a supported, called module).
  """
  leaves = dict(_paths.iter_leaves(params))
  paths = ["/".join(p) for p in leaves]
  for rule in config.target_rules:
    if not any(re.fullmatch(rule, p) for p in paths):
      hint = near_misses(rule, paths)
      raise JloraError(
          f"LoRA target rule {rule!r} matches no parameter path (rules are re.fullmatch-ed against '/'-joined "
          f"paths such as {paths[0]!r}). " + (f"Near misses: {hint}." if hint else f"Some paths: {paths[:8]}.")
      )
  seen = _record_calls(model, params, args, kwargs)
  targets = {}
  for path, leaf in leaves.items():
    joined = "/".join(path)
    if not config.matches(joined):
      continue
    owner, name = path[:-1], path[-1]
    record = seen.get(owner)
    if record is None:
      raise JloraError(f"LoRA target '{joined}' belongs to module '{'/'.join(owner)}', which the traced forward "
                       "never called, so jlora cannot know how it is used. Narrow LoraConfig.targets.")
    if record.param != name:
      what = f"the {name!r} parameter of {record.module_type}"
      raise JloraError(f"LoRA target '{joined}' is {what}; jlora adapts only the kernels of {SUPPORTED} "
                       "(no dense fallback). Narrow LoraConfig.targets to exclude it.")
    inner = record.layout.shape
    n_stack = len(leaf.shape) - len(inner)
    if n_stack < 0 or tuple(leaf.shape[n_stack:]) != inner:
      raise JloraError(f"LoRA target '{joined}' has shape {tuple(leaf.shape)} in params but {inner} inside "
                       f"{record.module_type}; jlora supports stacked-layer axes only as leading axes "
                       "(nn.scan/nn.vmap with variable_axes 0).")
    rank = config.rank_for(joined)
    targets[joined] = Target(
        path=joined,
        module_type=record.module_type,
        kind=record.kind,
        layout=record.layout,
        stack_shape=tuple(leaf.shape[:n_stack]),
        rank=rank,
        scale=config.scale_for(joined, rank),
    )
  return targets
