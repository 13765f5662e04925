"""tree_shardings_like: shardings for trees whose leaves mirror parameters (optimizer state, train state)."""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.sharding._specs import path_names, spec_problem, specs_by_path


def tree_shardings_like(tree: Any, specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding``s for ``tree`` whose leaves follow the parameters they mirror; the rest replicated.

  A leaf whose path ends with the path of a spec in ``specs`` (the longest such path) gets that spec,
  if the spec fits the leaf's shape; every other leaf (step counters, rng keys, scalars, factored
  statistics of another shape) is replicated. Optax states hold their per-parameter trees under
  extra keys (``[0].mu['lora'][...]``, ``.inner_states['b'].inner_state[0].nu[...]``), so this covers
  ``adam``/``adamw``, ``chain``, ``masked``, ``multi_transform`` (``jlora.lora_plus``) and whole train
  states such as ``{"trainable", "opt_state", "step", "rng"}`` in one call.

  Args:
    tree: the tree to place: arrays or ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of its init).
    specs: a tree of ``PartitionSpec`` for the parameters, e.g.
      ``{"lora": adapter_specs(adapters, specs, lora.targets), "head": ...}``.
    mesh: the device mesh.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tree``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import sharding
    >>> mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    >>> trainable = {"lora": {"w": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 8))}}}
    >>> trainable_specs = {"lora": {"w": {"lora_a": P("fsdp", None), "lora_b": P(None, None)}}}
    >>> state = {"trainable": trainable, "opt_state": optax.adam(1e-3).init(trainable), "step": jnp.zeros(())}
    >>> shardings = sharding.tree_shardings_like(jax.eval_shape(lambda: state), trainable_specs, mesh)
    >>> shardings["opt_state"][0].mu["lora"]["w"]["lora_a"].spec, shardings["step"].spec
    (P('fsdp', None), P())
  """
  by_path = specs_by_path(specs)
  lengths = sorted({len(path) for path in by_path}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def sharding_for(keypath, leaf):
    names = path_names(keypath)
    for n in lengths:
      if 0 < n <= len(names) and names[-n:] in by_path:
        spec = by_path[names[-n:]]
        if spec_problem(spec, tuple(np.shape(leaf)), mesh) is None:
          return NamedSharding(mesh, spec)
        return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_for, tree)
