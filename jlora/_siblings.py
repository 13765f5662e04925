"""Sibling adapters share one down-projection: ``x @ [A_q | A_k | A_v]`` is one matmul, not three.

Modules that read the same input (a Llama attention's q/k/v projections, its MLP's gate/up) each compute a
skinny ``x @ A`` (``d x r``). With their ``A`` factors concatenated along the rank axis, one matmul computes
all of them, and autodiff makes the backward one matmul for ``dx`` and one for the concatenated ``dA`` too.
The up-projections ``h @ B`` stay separate (each sibling's output is its own).

Which modules read one input is recorded once, when ``Lora.trace`` traces the model (``record_siblings``):
sibling modules (one parent) of the einsum family (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``) called
with the very same input. At apply time the first sibling called computes the whole group's ``x @ A``
(``SiblingCache``) from the ``A`` factors in the parent's params, and every sibling takes its own slice, but
only after checking that it is called with that very input, that its own ``A`` is the one used, and that its
equation, compute dtype and precision are the ones used. A call pattern other than the traced one therefore
computes ungrouped, never wrongly. The results equal the ungrouped ones up to the summation order of the
matmul (each column of ``x @ [A_q | A_k]`` is the same dot product as in ``x @ A_q``).

Only plain LoRA (and PiSSA/OLoRA, which apply as LoRA) is grouped, and only without active adapter dropout
(each module draws its own mask, so the siblings' inputs differ). Other variants, convolutions, embeddings,
kernels with batch axes and ``jlora.nnx`` modules compute their own path.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._einsum import low_rank_subscripts
from jlora._linen_bindings import binding_for
from jlora._linen_call import get_input, input_name

# Module path of a member -> the names of its group (siblings under one parent, in call order).
Groups = Mapping[tuple[str, ...], tuple[str, ...]]


def record_siblings() -> tuple[Callable, Callable[[Mapping], dict]]:
  """An interceptor that records which einsum-family modules read the same input, and the function that
  turns the record into groups once the trace is done.

  Returns:
    ``(interceptor, groups)``: run the traced forward inside ``nn.intercept_methods(interceptor)``, then
    ``groups(targets)`` gives ``{member module path: group names}`` for groups of two or more targets.
  """
  calls: dict[tuple, tuple[Any, list[tuple[str, str]]]] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    binding = binding_for(module)
    if (binding is not None and binding.equation is not None and context.method_name in binding.methods
        and module.path):
      x = get_input(args, kwargs, input_name(context.method_name))
      # The input is kept alive with the record, so no other array can reuse its id during the trace.
      _, members = calls.setdefault((module.path[:-1], id(x)), (x, []))
      members.append((module.path[-1], binding.param))
    return next_fun(*args, **kwargs)

  def groups(targets: Mapping) -> dict[tuple[str, ...], tuple[str, ...]]:
    found: dict[tuple[str, ...], tuple[str, ...]] = {}
    conflicting = set()
    for (parent, _), (_, members) in calls.items():
      names = tuple(dict.fromkeys(name for name, param in members if "/".join(parent + (name, param)) in targets))
      if len(names) < 2:
        continue
      for name in names:
        path = parent + (name,)
        if found.setdefault(path, names) != names:
          conflicting.add(path)
    # A module called in two different groupings is left ungrouped (its calls would disagree).
    return {path: names for path, names in found.items() if path not in conflicting}

  return interceptor, groups


@dataclasses.dataclass
class _Down:
  """One group's ``x @ [A_1 | ... | A_n]`` for one input: the slices and what they were computed from."""

  x: Any
  factors: dict[str, Any]
  key: tuple
  slices: dict[str, jax.Array]


class SiblingCache:
  """The group down-projections computed within one ``Lora.intercept`` context, keyed by parent and input."""

  def __init__(self, groups: Groups):
    self.groups = groups
    self._entries: dict[tuple, _Down] = {}

  def down(self, module: nn.Module, method: str, args: tuple, kwargs: dict, layout, a: jax.Array, slot: str,
           dtype, precision) -> jax.Array | None:
    """This module's ``dropout-free x @ a`` from its group's one matmul, or None when it is not grouped here.

    Args:
      module: the bound einsum-family module being called.
      method, args, kwargs: its call.
      layout: its kernel layout (no batch axes: those give every slice its own factors).
      a: its own ``lora_a`` as the variant passes it.
      slot: the adapter slot's name in each sibling's params.
      dtype: the compute dtype of the low-rank path (the module's output dtype).
      precision: the module's matmul precision.
    """
    names = self.groups.get(module.path)
    if not names or layout.batch_axes:
      return None
    binding = binding_for(module)
    x = get_input(args, kwargs, input_name(method))
    equation = binding.equation(module, method, args, kwargs, layout.shape)
    down, _ = low_rank_subscripts(equation, layout)
    key = (down, jnp.dtype(dtype), precision)
    name = module.path[-1]
    entry = self._entries.get((module.path[:-1], id(x)))
    if entry is None or entry.x is not x:
      entry = self._compute(module, names, x, a, slot, key, layout)
      if entry is None:
        return None
    if entry.key != key or entry.factors.get(name) is not a:
      return None
    return entry.slices[name]

  def _compute(self, module: nn.Module, names: tuple[str, ...], x, a: jax.Array, slot: str, key: tuple,
               layout) -> _Down | None:
    parent = module.scope.parent
    if parent is None:
      return None
    params = parent.variables().get("params", {})
    factors = {}
    for name in names:
      node = params.get(name, {}).get(slot)
      factor = None if node is None else node.get("lora_a")
      if factor is not None and factor.shape[:-1] == a.shape[:-1] and factor.dtype == a.dtype:
        factors[name] = factor
    # The module's own factor must be the parent's very array: then all of them live in one trace and scope.
    if factors.get(module.path[-1]) is not a or len(factors) < 2:
      return None
    down, dtype, precision = key
    a_cat = jnp.concatenate([f.astype(dtype) for f in factors.values()], axis=-1)
    h_cat = jnp.einsum(down, jnp.asarray(x, dtype), a_cat, precision=precision)
    slices, start = {}, 0
    for name, factor in factors.items():
      rank = factor.shape[-1]
      slices[name] = jax.lax.slice_in_dim(h_cat, start, start + rank, axis=-1)
      start += rank
    entry = _Down(x, factors, key, slices)
    self._entries[(module.path[:-1], id(x))] = entry
    return entry

