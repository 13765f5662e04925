"""param_specs / named / shard: from rules to PartitionSpecs to NamedShardings to placed arrays."""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import quant
from jlora._errors import JloraError
from jlora._variant import STATE_KEY
from jlora.sharding._rules import compile_rules

_MAX_LISTED = 10


def path_names(keypath: Sequence[Any]) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as plain names: dict keys, attribute names, sequence indices."""
  names = []
  for key in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def spec_problem(spec: P, shape: tuple[int, ...], mesh: Mesh) -> str | None:
  """Why ``spec`` cannot shard an array of ``shape`` over ``mesh``, or None if it can.

  ``P()`` fits any rank (replicated); any other spec needs one entry per dimension, so that a stacked
  layer axis is never split by a rule written for the unstacked kernel.
  """
  if len(spec) == 0:
    return None
  if len(spec) != len(shape):
    return (f"spec {spec} has {len(spec)} entries but the shape {shape} has {len(shape)} dimensions (one entry per "
            "dimension; stacked nn.scan params have a leading layer axis: put None first; P() replicates)")
  sizes = dict(mesh.shape)
  used: list[str] = []
  for dim, (entry, size) in enumerate(zip(spec, shape)):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    for axis in axes:
      if axis not in sizes:
        return f"spec {spec} names mesh axis {axis!r}, but the mesh has axes {dict(sizes)}"
      if axis in used:
        return f"spec {spec} uses mesh axis {axis!r} twice"
      used.append(axis)
    parts = math.prod(sizes[axis] for axis in axes)
    if size % parts:
      split = " x ".join(f"{axis}={sizes[axis]}" for axis in axes)
      return (f"mesh axes {split} ({parts} parts) do not divide dimension {dim} (size {size}) of shape {shape} "
              f"under spec {spec}")
  return None


def param_specs(params: Any, rules: Iterable[tuple[str, Any]], mesh: Mesh) -> Any:
  """A ``PartitionSpec`` per parameter: the spec of the first rule whose regex fullmatches its path.

  Paths are '/'-joined (``model/layers/self_attn/q_proj/kernel``). The shared frozen state of adapter variants
  (``params["jlora:state"]``, e.g. VeRA's projections, small and read by every layer) is replicated unless a rule
  covers it. Every spec is checked against the parameter's shape and the mesh: one entry per dimension (or ``P()``,
  replicated), known mesh axes, and axis sizes that divide the dimension they split (axes of size 1 always do).

  Args:
    params: a params tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    rules: ``(regex, PartitionSpec or tuple)`` pairs, e.g. ``rules_for(model)``.
    mesh: the device mesh.

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``params``.

  Raises:
    JloraError: parameters no rule covers, or whose spec does not fit (all listed, each named).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    >>> params = {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
    >>> sharding.param_specs(params, [(".*/kernel", P("fsdp", None)), (".*", P())], mesh)
    {'dense': {'bias': P(), 'kernel': P('fsdp', None)}}
  """
  compiled = compile_rules(rules)
  problems: list[str] = []

  def spec_for(keypath, leaf):
    path = "/".join(path_names(keypath))
    shape = tuple(np.shape(leaf))
    for regex, spec in compiled:
      if regex.fullmatch(path):
        problem = spec_problem(spec, shape, mesh)
        if problem:
          problems.append(f"param '{path}' (rule {regex.pattern!r}): {problem}")
        elif quant.is_quantized(leaf):  # a spec per codes/statistics leaf, split like the float kernel
          try:
            return quant.partition_specs(leaf, spec, mesh)
          except JloraError as e:
            problems.append(f"param '{path}' (rule {regex.pattern!r}): {str(e).rstrip('.')}")
        return spec
    if path.split("/", 1)[0] == STATE_KEY:  # a variant's shared frozen state (VeRA's projections): replicated
      return P()
    problems.append(f"no rule covers param '{path}' (shape {shape}); add a (regex, PartitionSpec) rule for it, "
                    "e.g. (regex, P()) to replicate it")
    return P()

  specs = jax.tree_util.tree_map_with_path(spec_for, params, is_leaf=quant.is_quantized)
  if problems:
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    raise JloraError(f"Cannot shard {len(problems)} parameter(s) over mesh {dict(mesh.shape)}{more}: "
                     + "; ".join(problems[:_MAX_LISTED]) + ".")
  return specs


def named(specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` of ``specs`` (same tree structure).

  Example:
    >>> import jax
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    >>> sharding.named({"w": P("data")}, mesh)["w"].spec
    P('data',)
  """
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard(params: Any, shardings: Any) -> Any:
  """Places ``params`` with ``shardings`` (a tree of ``jax.sharding.Sharding``): ``jax.device_put``.

  For params that one host holds in full; to load a checkpoint straight into shards use
  ``jlora.models.from_pretrained(..., mesh=mesh)``. In a multi-host job every host must pass the same
  values. Arrays on one CPU device are placed from their host buffer: moving a committed array to
  another sharding otherwise compiles one reshard program per shape (seconds for a model on CPU).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    >>> placed = sharding.shard({"w": jnp.ones((2, 4))}, sharding.named({"w": P(None, "data")}, mesh))
    >>> placed["w"].sharding.spec
    P(None, 'data')
  """
  return jax.device_put(jax.tree.map(_host_view_if_cpu, params), shardings)


def _host_view_if_cpu(x: Any) -> Any:
  if (isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)
      and x.is_fully_addressable and len(x.devices()) == 1 and next(iter(x.devices())).platform == "cpu"):
    return np.asarray(x)  # no copy: the CPU buffer itself
  return x


def specs_by_path(specs: Any) -> Mapping[tuple[str, ...], P]:
  """``{path names: spec}`` for a tree of ``PartitionSpec``; a quantized kernel's leaf specs give its kernel spec."""
  flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P) or quant.is_quantized(x))
  return {path_names(keypath): quant.kernel_spec(spec) if quant.is_quantized(spec) else spec for keypath, spec in flat}
