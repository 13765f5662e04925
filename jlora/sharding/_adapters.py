"""adapter_specs: each LoRA factor is split like the kernel axes it stands for."""

from collections.abc import Mapping
from typing import Any

from jax.sharding import PartitionSpec as P

from jlora import _paths
from jlora._errors import JloraError
from jlora._targets import Target
from jlora.sharding._specs import specs_by_path

_FACTORS = ("lora_a", "lora_b")


def adapter_specs(adapters: Mapping, specs: Any, targets: Mapping[str, Target]) -> dict:
  """``PartitionSpec``s for an adapter tree, derived from its kernels' specs.

  A kernel at path ``P`` with spec ``(stack..., native...)`` (one entry per stacked layer axis, then
  one per kernel axis in the kernel's own order) gets, with ``batch``/``in``/``out`` the native axes
  its ``KernelLayout`` names (einsum kernels may interleave them)::

      lora_a: (stack..., native[batch]..., native[in]...,  None)     # A: stack + batch + in + (r,)
      lora_b: (stack..., native[batch]..., None, native[out]...)    # B: stack + batch + (r,) + out

  so ``x @ A`` contracts over the axes the kernel splits for its input and ``B`` splits its output
  like the kernel does; the rank axis is never split. A kernel spec ``P()`` (replicated) gives
  replicated factors. Optimizer state follows with :func:`tree_shardings_like`.

  Args:
    adapters: the adapter tree (arrays or ``jax.ShapeDtypeStruct``, e.g. for a restore), or a subtree
      of it holding whole ``{"lora_a", "lora_b"}`` nodes at their kernels' paths.
    specs: the base params' spec tree from :func:`param_specs` (a tree of ``PartitionSpec``).
    targets: the adapted kernels, ``lora.targets`` (after ``lora.init`` or ``lora.trace``).

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``adapters``.

  Raises:
    JloraError: an adapter without a target or kernel spec, a leaf other than ``lora_a``/``lora_b``,
      a factor whose shape does not fit its target, or a kernel spec of the wrong length.

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
  nodes = list(_paths.iter_dicts(adapters, lambda d: bool(set(_FACTORS) & set(d))))
  n_leaves = sum(1 for _ in _paths.iter_leaves(adapters))
  if n_leaves != 2 * len(nodes):
    stray = [_paths.join(p) for p, _ in _paths.iter_leaves(adapters) if p[-1] not in _FACTORS]
    raise JloraError(f"adapter_specs: leaves outside any {{'lora_a', 'lora_b'}} adapter: {stray[:8]}; "
                     "only LoRA adapter trees are supported.")
  out = {}
  for path, node in nodes:
    joined = _paths.join(path)
    if set(node) != set(_FACTORS):
      raise JloraError(f"adapter_specs: adapter at '{joined}' has keys {sorted(node)}, expected {list(_FACTORS)}.")
    target = targets.get(joined)
    if target is None:
      raise JloraError(f"adapter_specs: adapter at '{joined}' is not among the targets "
                       f"({list(targets)[:8]}...); pass lora.targets of the Lora that made these adapters.")
    if path not in kernel_specs:
      raise JloraError(f"adapter_specs: no spec for the kernel '{joined}' in specs; pass the spec tree of the "
                       "base params (sharding.param_specs).")
    lora_a, lora_b = factor_specs(target, kernel_specs[path])
    for name in ("lora_a", "lora_b"):
      want = target.stack_shape + (target.layout.a_shape if name == "lora_a" else target.layout.b_shape)(target.rank)
      got = tuple(node[name].shape)
      if got != want:
        raise JloraError(f"adapter_specs: '{joined}/{name}' has shape {got}, but its target needs {want} "
                         "(adapters from another model or LoraConfig?).")
    out[path] = {"lora_a": lora_a, "lora_b": lora_b}
  return _paths.nest(out)


def factor_specs(target: Target, kernel_spec: P) -> tuple[P, P]:
  """``(lora_a spec, lora_b spec)`` of one target from its kernel's spec (see :func:`adapter_specs`)."""
  layout = target.layout
  n_stack = len(target.stack_shape)
  rank = n_stack + len(layout.shape)
  if len(kernel_spec) == 0:
    return P(), P()
  if len(kernel_spec) != rank:
    raise JloraError(f"adapter_specs: the spec {kernel_spec} of kernel '{target.path}' has {len(kernel_spec)} "
                     f"entries; the kernel {target.stack_shape + layout.shape} has {rank} dimensions.")
  entries = tuple(kernel_spec)
  stack, native = entries[:n_stack], entries[n_stack:]
  batch = tuple(native[i] for i in layout.batch_axes)
  ins = tuple(native[i] for i in layout.in_axes)
  outs = tuple(native[i] for i in layout.out_axes)
  return P(*stack, *batch, *ins, None), P(*stack, *batch, None, *outs)
