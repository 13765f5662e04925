"""adapter_specs: each adapter leaf (of any variant) is split like the kernel axes it stands for."""

from collections.abc import Mapping
from typing import Any

from jax.sharding import PartitionSpec as P

from jlora import _paths
from jlora._errors import JloraError
from jlora._targets import Target
from jlora._variant import Variant, leaf_shapes
from jlora.sharding._specs import specs_by_path
from jlora.variants import VARIANTS, trainable_leaves


def _variant_of(node: Mapping, where: str) -> Variant:
  """The registered variant whose leaves are exactly ``node``'s keys."""
  for variant in VARIANTS.values():
    if set(variant.leaf_names) == set(node):
      return variant
  known = {name: sorted(v.leaf_names) for name, v in VARIANTS.items()}
  raise JloraError(f"adapter_specs: adapter at '{where}' has keys {sorted(node)}, which are no variant's leaves "
                   f"({known}).")


def adapter_specs(adapters: Mapping, specs: Any, targets: Mapping[str, Target]) -> dict:
  """``PartitionSpec``s for an adapter tree, derived from its kernels' specs.

  A kernel at path ``P`` with spec ``(stack..., native...)`` (one entry per stacked layer axis, then
  one per kernel axis in the kernel's own order) gets, with ``batch``/``in``/``out`` the native axes
  its ``KernelLayout`` names (einsum kernels may interleave them)::

      lora_a: (stack..., native[batch]..., native[in]...,  None)     # A: stack + batch + in + (r,)
      lora_b: (stack..., native[batch]..., None, native[out]...)    # B: stack + batch + (r,) + out
      lora_magnitude: (stack..., native[batch]..., native[out]...)  # DoRA's m: one per output feature

  so ``x @ A`` contracts over the axes the kernel splits for its input and ``B`` splits its output
  like the kernel does; the rank axis is never split. In general every leaf axis is split like the kernel
  axis it stands for (``jlora.Variant.leaves``), for every variant. A kernel spec ``P()`` (replicated)
  gives replicated leaves. Optimizer state follows with :func:`tree_shardings_like`.

  Args:
    adapters: the adapter tree (arrays or ``jax.ShapeDtypeStruct``, e.g. for a restore), or a subtree
      of it holding whole adapter nodes at their kernels' paths.
    specs: the base params' spec tree from :func:`param_specs` (a tree of ``PartitionSpec``).
    targets: the adapted kernels, ``lora.targets`` (after ``lora.init`` or ``lora.trace``).

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``adapters``.

  Raises:
    JloraError: an adapter without a target or kernel spec, a node whose leaves are no variant's, a leaf
      outside any adapter, a leaf whose shape does not fit its target, or a kernel spec of the wrong length.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> from jlora import sharding
    >>> model = nn.Dense(8, name="proj")
    >>> x = jnp.ones((2, 4))
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]   # arrays work too
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=2))
    >>> adapters = jax.eval_shape(lora.init, jax.random.key(1), params, x)
    >>> specs = {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}
    >>> sharding.adapter_specs(adapters, specs, lora.targets)
    {'kernel': {'lora_a': P('fsdp', None), 'lora_b': P(None, 'tensor')}}
  """
  kernel_specs = specs_by_path(specs)
  names = trainable_leaves()
  nodes = list(_paths.iter_dicts(adapters, lambda d: bool(set(names) & set(d))))
  stray = [_paths.join(p) for p, _ in _paths.iter_leaves(adapters) if p[-1] not in names]
  if stray or any(isinstance(v, Mapping) for _, node in nodes for v in node.values()):
    raise JloraError(f"adapter_specs: leaves outside any adapter: {stray[:8]}; only adapter trees (of every "
                     f"variant's leaves {list(names)}) are supported.")
  out = {}
  for path, node in nodes:
    joined = _paths.join(path)
    variant = _variant_of(node, joined)
    target = targets.get(joined)
    if target is None:
      raise JloraError(f"adapter_specs: adapter at '{joined}' is not among the targets "
                       f"({list(targets)[:8]}...); pass lora.targets of the Lora that made these adapters.")
    if path not in kernel_specs:
      raise JloraError(f"adapter_specs: no spec for the kernel '{joined}' in specs; pass the spec tree of the "
                       "base params (sharding.param_specs).")
    leaf_specs = variant_specs(variant, target, kernel_specs[path])
    for name, want in leaf_shapes(variant, target).items():
      got = tuple(node[name].shape)
      if got != want:
        raise JloraError(f"adapter_specs: '{joined}/{name}' has shape {got}, but its target needs {want} "
                         "(adapters from another model or LoraConfig?).")
    out[path] = leaf_specs
  return _paths.nest(out)


def variant_specs(variant: Variant, target: Target, kernel_spec: P) -> dict[str, P]:
  """Each adapter leaf's spec from its kernel's spec: every leaf axis split like the kernel axis it stands for."""
  layout = target.layout
  n_stack = len(target.stack_shape)
  rank = n_stack + len(layout.shape)
  leaves = variant.leaves(target)
  if len(kernel_spec) == 0:
    return {name: P() for name in leaves}
  if len(kernel_spec) != rank:
    raise JloraError(f"adapter_specs: the spec {kernel_spec} of kernel '{target.path}' has {len(kernel_spec)} "
                     f"entries; the kernel {target.stack_shape + layout.shape} has {rank} dimensions.")
  entries = tuple(kernel_spec)
  stack, native = entries[:n_stack], entries[n_stack:]
  return {name: P(*stack, *(None if i is None else native[i] for i in axes)) for name, axes in leaves.items()}


def factor_specs(target: Target, kernel_spec: P) -> tuple[P, P]:
  """``(lora_a spec, lora_b spec)`` of one target from its kernel's spec (see :func:`adapter_specs`)."""
  specs = variant_specs(VARIANTS["lora"], target, kernel_spec)
  return specs["lora_a"], specs["lora_b"]
