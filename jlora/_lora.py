"""Lora: LoRA as a transform of an unmodified flax.linen model and its params tree."""

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora import _paths
from jlora._config import LoraConfig
from jlora._dropout import inverted_dropout
from jlora._errors import JloraError
from jlora._linen_bindings import binding_for
from jlora._summary import Summary, summarize
from jlora._targets import Target, find_targets
from jlora._variant import LORA, Variant
from jlora.quant._call import module_call
from jlora.quant._tree import logical_shapes

# An adapter rides beside the parameter it adapts, inside the params collection, under this prefix.
# That way nn.scan / nn.vmap / nn.remat slice and broadcast it exactly like the kernel itself, and
# the base tree is never re-stacked or copied.
SLOT_PREFIX = "jlora:"


class Lora:
  """LoRA for an unmodified ``flax.linen`` model.

  The frozen ``params`` and trainable ``adapters`` are two separate trees. For every targeted kernel
  ``W`` at path ``P`` the adapter tree holds ``{"lora_a": A, "lora_b": B}`` at ``P``, and the
  adapted module computes

      y = base(x) + s * (dropout(x) @ A) @ B,      s = alpha / r

  without ever materialising ``W + s * A @ B`` (so ``jax.grad`` w.r.t. the adapters never computes
  the frozen kernels' gradient). ``merge`` folds the update into plain params for serving.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Sequential([nn.Dense(16, name="up"), nn.relu, nn.Dense(4, name="down")])
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=4.0))
    >>> adapters = lora.init(jax.random.key(1), params, x)
    >>> jax.tree.map(jnp.shape, adapters["layers_0"])
    {'kernel': {'lora_a': (8, 2), 'lora_b': (2, 16)}}
    >>> bool(jnp.allclose(lora.apply(params, adapters, x), model.apply({"params": params}, x)))
    True
  """

  def __init__(self, model: nn.Module, config: LoraConfig, *, variant: Variant = LORA):
    if not isinstance(model, nn.Module):
      raise JloraError(f"jlora.Lora wraps a flax.linen Module, got {type(model).__name__}; "
                       "for flax.nnx models use jlora.nnx.")
    self.model = model
    self.config = config
    self.variant = variant
    self._targets: dict[str, Target] | None = None
    self._apply_fns: dict[tuple, Callable] = {}

  # --- discovering targets ------------------------------------------------------------------------

  def trace(self, params: Mapping, *args, **kwargs) -> Mapping[str, Target]:
    """Finds the adapted kernels by tracing ``model.apply({"params": params}, *args, **kwargs)``.

    Tracing is abstract (``jax.eval_shape``): ``params`` and the inputs may be arrays or
    ``jax.ShapeDtypeStruct``. ``init`` calls this; call it yourself before ``merge``/``unmerge`` on a
    fresh ``Lora`` whose adapters were loaded rather than initialised.

    Returns:
      ``{kernel path: Target}`` in params order.
    """
    self._targets = find_targets(self.model, self.config, logical_shapes(params), args, kwargs)
    return self._targets

  @property
  def targets(self) -> Mapping[str, Target]:
    """The adapted kernels found by the last ``init``/``trace``."""
    if self._targets is None:
      raise JloraError("This Lora has not traced its model yet: call lora.init(key, params, *example_inputs) "
                       "or lora.trace(params, *example_inputs) first so jlora knows each kernel's layout.")
    return self._targets

  def init(self, key: jax.Array, params: Mapping, *args, **kwargs) -> dict:
    """Creates the adapter tree: ``A`` random (per ``config.init``), ``B`` zero, so output is unchanged.

    Args:
      key: PRNG key for the ``A`` factors.
      params: the frozen params (arrays or ``jax.ShapeDtypeStruct``).
      *args, **kwargs: example inputs, as for ``model.apply``; used for an abstract trace only.

    Returns:
      A nested dict with ``{"lora_a", "lora_b"}`` at each targeted kernel's path, in
      ``config.dtype``; stacked (``nn.scan``) kernels get the same leading layer axes.
    """
    targets = self.trace(params, *args, **kwargs)
    # Each kernel's key depends on its path only: not on dict order, nor on which other kernels are targeted.
    return _paths.nest({
        tuple(path.split("/")): self.variant.init(jax.random.fold_in(key, zlib.crc32(path.encode())), target, self.config)
        for path, target in targets.items()
    })

  # --- applying -------------------------------------------------------------------------------------

  def apply(self, params: Mapping, adapters: Mapping, *args, lora_dropout: bool | None = None,
            collections: Mapping[str, Any] | None = None, **kwargs) -> Any:
    """``model.apply`` with the adapters active.

    Args:
      params: frozen params.
      adapters: the adapter tree from ``init`` (or a loaded one).
      *args: model inputs.
      lora_dropout: ``None`` (default): adapter dropout is on iff a ``"dropout"`` rng is passed in
        ``rngs``; ``True``: on, and a missing rng is an error; ``False``: off.
      collections: other variable collections (``"cache"``, ``"batch_stats"``, ...).
      **kwargs: passed to ``model.apply`` (``rngs``, ``mutable``, ``method``, model kwargs).
    """
    variables = {**(collections or {}), "params": self.inject(params, adapters)}
    with self.intercept(lora_dropout=lora_dropout):
      return self.model.apply(variables, *args, **kwargs)

  def apply_fn(self, adapters: Mapping | None = None, *, lora_dropout: bool | None = None) -> Callable[..., Any]:
    """A function with ``model.apply``'s signature ``(variables, *args, **kwargs)`` with adapters active,
    for code written against ``model.apply`` (e.g. ``jlora.models.generate``).

    Args:
      adapters: adapters to close over; the function then injects them into ``variables["params"]``.
        With None, the function expects ``variables["params"] = lora.inject(params, adapters)``, so the
        adapters are ordinary (traced) arguments: one such function serves every adapter value, and
        code that jits on the function's identity compiles once. That form is cached per Lora.
      lora_dropout: as in ``apply``.
    """
    if adapters is None:
      key = ("injected", lora_dropout)
      if key not in self._apply_fns:

        def apply_injected(variables: Mapping, *args, **kwargs):
          with self.intercept(lora_dropout=lora_dropout):
            return self.model.apply(variables, *args, **kwargs)

        self._apply_fns[key] = apply_injected
      return self._apply_fns[key]

    def apply(variables: Mapping, *args, **kwargs):
      variables = {**variables, "params": self.inject(variables["params"], adapters)}
      with self.intercept(lora_dropout=lora_dropout):
        return self.model.apply(variables, *args, **kwargs)

    return apply

  def inject(self, params: Mapping, adapters: Mapping) -> dict:
    """The params tree the model sees: ``params`` plus each adapter in a slot beside its kernel.

    Only the dicts on the adapted paths are copied; the frozen arrays are shared.
    """
    updates = {}
    for path, node in self._adapter_nodes(adapters):
      if not _paths.contains(params, path) or not hasattr(_paths.get(params, path), "shape"):
        raise JloraError(f"Adapter at '{_paths.join(path)}' has no matching parameter in params: "
                         "was it made for another model or another params layout?")
      updates[path[:-1] + (SLOT_PREFIX + path[-1],)] = dict(node)
    return _paths.replace(params, updates)

  @contextlib.contextmanager
  def intercept(self, *, lora_dropout: bool | None = None) -> Iterator[None]:
    """Context in which adapted modules add their adapter's contribution (see ``inject``)."""
    with nn.intercept_methods(functools.partial(self._interceptor, lora_dropout)):
      yield

  def _interceptor(self, lora_dropout, next_fun, args, kwargs, context):
    module = context.module
    binding = binding_for(module)
    # A quantized kernel is dequantized inside this call (jlora.quant); otherwise this is next_fun.
    base = module_call(module, context.method_name, binding, next_fun)
    if binding is None or context.method_name not in binding.methods:
      return base(*args, **kwargs)
    slot = SLOT_PREFIX + binding.param
    if not module.has_variable("params", slot):
      return base(*args, **kwargs)
    adapter = module.get_variable("params", slot)
    path = "/".join(module.path + (binding.param,))
    kernel = module.get_variable("params", binding.param)
    layout = binding.layout(module, context.method_name, args, kwargs, kernel.shape)
    rank = self.config.rank_for(path)
    target = Target(path, type(module).__name__, binding.kind, layout, (), rank, self.config.scale_for(path, rank))
    self._check_adapter(target, adapter, "inside the model")
    base_out = base(*args, **kwargs)
    dropout = self._dropout(module, lora_dropout, path)

    def low_rank(a, b):
      return binding.low_rank(module, context.method_name, args, kwargs, layout, a, b, dropout, base_out.dtype)

    return self.variant.apply(adapter, base_out, low_rank, target.scale)

  def _dropout(self, module: nn.Module, mode: bool | None, path: str) -> Callable[[jax.Array], jax.Array]:
    rate = self.config.dropout
    if mode is False or rate == 0.0:
      return lambda x: x
    if not module.has_rng("dropout"):
      if mode:
        raise JloraError(f"lora_dropout=True but no 'dropout' rng reached '{path}': pass rngs={{'dropout': key}} "
                         "(and split 'dropout' in nn.scan/nn.vmap).")
      return lambda x: x
    rng = module.make_rng("dropout")
    return lambda x: inverted_dropout(rng, rate, x)

  # --- merging --------------------------------------------------------------------------------------

  def merge(self, params: Mapping, adapters: Mapping) -> dict:
    """Plain params with every adapter folded in: ``W' = W + s * A @ B``.

    Computed in float32 and cast once to each kernel's dtype, so
    ``model.apply({"params": lora.merge(params, adapters)}, x) == lora.apply(params, adapters, x)``.
    """
    return self._fold(params, adapters, self.variant.merge)

  def unmerge(self, merged: Mapping, adapters: Mapping) -> dict:
    """The inverse of ``merge``: ``W = W' - s * A @ B`` (float32, cast once)."""
    return self._fold(merged, adapters, self.variant.unmerge)

  def _fold(self, params: Mapping, adapters: Mapping, fold: Callable) -> dict:
    targets = self.targets
    updates = {}
    for path, node in self._adapter_nodes(adapters):
      joined = _paths.join(path)
      if joined not in targets:
        raise JloraError(f"Adapter at '{joined}' is not a target of this Lora (targets: {list(targets)[:8]}...).")
      target = targets[joined]
      self._check_adapter(target, node, "in the adapter tree")
      updates[path] = fold(_paths.get(params, path), node, target.layout, target.scale)
    return _paths.replace(params, updates)

  # --- bookkeeping ------------------------------------------------------------------------------------

  def summary(self, params: Mapping, adapters: Mapping) -> Summary:
    """Trainable vs total parameters and a per-target table (``print(lora.summary(...))``)."""
    return summarize(params, adapters, self.targets)

  def _adapter_nodes(self, adapters: Mapping) -> list[tuple[tuple[str, ...], Mapping]]:
    names = set(self.variant.leaf_names)
    nodes = list(_paths.iter_dicts(adapters, lambda d: bool(names & set(d))))
    for path, node in nodes:
      if set(node) != names or any(isinstance(v, Mapping) for v in node.values()):
        raise JloraError(f"Adapter at '{_paths.join(path)}' has keys {sorted(node)}; a {self.variant.name} "
                         f"adapter has exactly {sorted(names)}.")
    n_leaves = sum(1 for _ in _paths.iter_leaves(adapters))
    if n_leaves != len(nodes) * len(names):
      stray = [_paths.join(p) for p, _ in _paths.iter_leaves(adapters) if p[-1] not in names]
      raise JloraError(f"Adapter tree has leaves outside any adapter: {stray[:8]}.")
    return nodes

  def _check_adapter(self, target: Target, node: Mapping, where: str) -> None:
    expected = jax.eval_shape(lambda k: self.variant.init(k, target, self.config), jax.random.key(0))
    for name, spec in expected.items():
      got = tuple(node[name].shape)
      if got != spec.shape:
        raise JloraError(f"Adapter '{target.path}/{name}' {where} has shape {got}, but rank {target.rank} on this "
                         f"{target.module_type} kernel {target.stack_shape + target.layout.shape} needs "
                         f"{spec.shape}: the adapter does not fit this model/LoraConfig (check rank/rank_pattern).")
