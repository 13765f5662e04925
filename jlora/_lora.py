"""Lora: LoRA as a transform of an unmodified flax.linen model and its params tree."""

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora import _paths
from jlora._alora import run_activated
from jlora._config import LoraConfig
from jlora._dropout import inverted_dropout
from jlora._errors import JloraError
from jlora._linen_bindings import binding_for
from jlora._linen_call import linen_call
from jlora._summary import Summary, summarize
from jlora._targets import Target, find_targets
from jlora._variant import STATE_KEY, Variant, leaf_shapes, split_state
from jlora.quant._call import module_call
from jlora.quant._quantized import is_quantized
from jlora.quant._tree import logical_shapes
from jlora.variants import to_plain_lora, variant_for

# An adapter rides beside the parameter it adapts, inside the params collection, under this prefix.
# That way nn.scan / nn.vmap / nn.remat slice and broadcast it exactly like the kernel itself, and
# the base tree is never re-stacked or copied.
SLOT_PREFIX = "jlora:"


class Lora:
  """LoRA (and every variant of the family) for an unmodified ``flax.linen`` model.

  The frozen ``params`` and trainable ``adapters`` are two separate trees. For every targeted kernel
  ``W`` at path ``P`` the adapter tree holds the variant's leaves at ``P`` (``{"lora_a": A, "lora_b": B}``
  for LoRA, plus ``"lora_magnitude"`` for DoRA), and the adapted module computes, for LoRA,

      y = base(x) + s * (dropout(x) @ A) @ B,      s = alpha / r

  without ever materialising ``W + s * A @ B`` (so ``jax.grad`` w.r.t. the adapters never computes
  the frozen kernels' gradient). ``merge`` folds the update into plain params for serving. The config
  selects the variant (``jlora.variants.variant_for``): ``use_dora=True`` is DoRA, ``init="pissa"``
  (``"pissa_niter_K"``, ``"olora"``) starts from the kernel and rewrites the base (``init_with_base``).

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

  def __init__(self, model: nn.Module, config: LoraConfig, *, variant: Variant | None = None):
    if not isinstance(model, nn.Module):
      raise JloraError(f"jlora.Lora wraps a flax.linen Module, got {type(model).__name__}; "
                       "for flax.nnx models use jlora.nnx.")
    self.model = model
    self.config = config
    self.variant = check_variant(config, variant)
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
    """Creates the adapter tree, which leaves the model's output unchanged (``A`` random, ``B`` zero for LoRA).

    Args:
      key: PRNG key for the random factors.
      params: the frozen params (arrays, or ``jax.ShapeDtypeStruct`` unless the variant reads the kernel's
        values, as DoRA does; ``jax.eval_shape(lora.init, ...)`` works for every variant).
      *args, **kwargs: example inputs, as for ``model.apply``; used for an abstract trace only.

    Returns:
      A nested dict with the variant's leaves (``{"lora_a", "lora_b"}`` for LoRA) at each targeted
      kernel's path, in ``config.dtype``; stacked (``nn.scan``) kernels get the same leading layer axes.

    Raises:
      JloraError: the config rewrites the base (PiSSA/OLoRA, or a variant with shared frozen state): use
        ``init_with_base``, which returns the base the adapters belong to.
    """
    if self.config.rewrites_base or self.variant.init_state is not None:
      raise JloraError(f"LoraConfig(init={self.config.init!r}, variant={self.variant.name!r}) changes the frozen "
                       "base as well as creating adapters: use params, adapters = lora.init_with_base(key, params, "
                       "*inputs), and train on the returned params.")
    return self.init_with_base(key, params, *args, **kwargs)[1]

  def init_with_base(self, key: jax.Array, params: Mapping, *args, **kwargs) -> tuple[dict, dict]:
    """Creates the adapters and the frozen params they belong to: ``(params', adapters)``.

    ``params'`` is ``params`` itself unless the variant changes the frozen side: PiSSA/OLoRA replace each
    targeted kernel by the residual ``W - s·A@B`` (in the kernel's dtype, requantized in its format when
    quantized), and a variant with shared frozen state adds it under ``params[jlora.STATE_KEY]``
    (see ``jlora.Variant``). The caller's tree is never modified; untouched arrays are shared.

    Args: as ``init``.

    Returns:
      ``(params', adapters)``; ``lora.apply(params', adapters, x)`` equals ``model.apply(params, x)`` at init.
      ``params'`` is the base the adapters belong to: fingerprint it (``jlora.fingerprint(params')``) when saving
      them, and train and serve on it.
    """
    targets = self.trace(params, *args, **kwargs)
    reads = self.variant.reads_kernel or self.config.rewrites_base
    adapters, updates = {}, {}
    for path, target in targets.items():
      keys = tuple(path.split("/"))
      kernel = _paths.get(params, keys)
      if isinstance(kernel, jax.ShapeDtypeStruct) and reads:
        raise JloraError(f"The {self.variant.name} adapter of '{path}' (init={self.config.init!r}) starts from the "
                         "kernel's values, but params are abstract (jax.ShapeDtypeStruct): pass the arrays, or use "
                         "jax.eval_shape(lora.init_with_base, key, params, *inputs) for shapes.")
      # A quantized kernel is dequantized only for a variant that reads its values.
      value = (kernel.dequantize() if reads else jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)) \
          if is_quantized(kernel) else kernel
      # Each kernel's key depends on its path only: not on dict order, nor on which other kernels are targeted.
      node_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
      adapters[keys], new_kernel = self.variant.init(node_key, target, self.config, value)
      if new_kernel is not value:
        updates[keys] = kernel.requantize(new_kernel) if is_quantized(kernel) else new_kernel.astype(kernel.dtype)
    if self.variant.init_state is not None:
      state = self.variant.init_state(jax.random.fold_in(key, zlib.crc32(STATE_KEY.encode())), targets, self.config)
      updates[(STATE_KEY,)] = {**params.get(STATE_KEY, {}), self.variant.name: state}
    return (_paths.replace(params, updates) if updates else params), _paths.nest(adapters)

  def to_plain_lora(self, adapters: Mapping, initial: Mapping) -> tuple[dict, LoraConfig]:
    """A PiSSA/OLoRA adapter as the rank-``2r`` plain LoRA on the original base (``jlora.variants.to_plain_lora``).

    Args:
      adapters: the trained adapters.
      initial: the adapters as ``init_with_base`` returned them.

    Returns:
      ``(adapters, config)`` to use with the original params (``Lora(model, config)``), to save, or to export
      with ``jlora.peft.save_pretrained``.
    """
    return to_plain_lora(adapters, initial, self.config, self.targets)

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
    model_params, state = split_state(self.inject(params, adapters))
    variables = {**(collections or {}), "params": model_params}
    return self._run(variables, args, kwargs, lora_dropout, state)

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
          model_params, state = split_state(variables["params"])
          return self._run({**variables, "params": model_params}, args, kwargs, lora_dropout, state)

        self._apply_fns[key] = apply_injected
      return self._apply_fns[key]

    def apply(variables: Mapping, *args, **kwargs):
      model_params, state = split_state(self.inject(variables["params"], adapters))
      return self._run({**variables, "params": model_params}, args, kwargs, lora_dropout, state)

    return apply

  def _run(self, variables: Mapping, args: tuple, kwargs: Mapping, lora_dropout: bool | None,
           state: Mapping | None) -> Any:
    """``model.apply`` inside ``intercept``; an activated LoRA first finds each row's invocation (``jlora._alora``)."""
    if self.config.invocation_tokens is not None:
      return run_activated(self, variables, args, kwargs, lora_dropout, state)
    with self.intercept(lora_dropout=lora_dropout, state=state):
      return self.model.apply(variables, *args, **kwargs)

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
  def intercept(self, *, lora_dropout: bool | None = None, state: Mapping | None = None) -> Iterator[None]:
    """Context in which adapted modules add their adapter's contribution (see ``inject``).

    ``state`` is the shared frozen state ``params[jlora.STATE_KEY]`` (None when the variant has
    none); ``apply`` and ``apply_fn`` split it off the params themselves.
    """
    variant_state = (state or {}).get(self.variant.name)
    if self.variant.init_state is not None and variant_state is None:
      raise JloraError(f"The {self.variant.name} adapters need their shared frozen state, params['{STATE_KEY}']"
                       f"['{self.variant.name}'] (lora.init_with_base returns params with it).")
    with nn.intercept_methods(functools.partial(self._interceptor, lora_dropout, variant_state)):
      yield

  def _interceptor(self, lora_dropout, state, next_fun, args, kwargs, context):
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
    dropout, training = self._dropout(module, lora_dropout, path)
    call = linen_call(module, context.method_name, binding, base, args, kwargs, target, dropout, training, state)
    return self.variant.apply(adapter, call)

  def _dropout(self, module: nn.Module, mode: bool | None, path: str) -> tuple[Callable[[jax.Array], jax.Array], bool]:
    rate = self.config.dropout
    if mode is False or rate == 0.0:
      return (lambda x: x), False
    if not module.has_rng("dropout"):
      if mode:
        raise JloraError(f"lora_dropout=True but no 'dropout' rng reached '{path}': pass rngs={{'dropout': key}} "
                         "(and split 'dropout' in nn.scan/nn.vmap).")
      return (lambda x: x), False
    # One key per call: every use of the dropped input (the low-rank path, DoRA's frozen term) sees one mask.
    rng = module.make_rng("dropout")
    return (lambda x: inverted_dropout(rng, rate, x)), True

  # --- merging --------------------------------------------------------------------------------------

  def merge(self, params: Mapping, adapters: Mapping) -> dict:
    """Plain params with every adapter folded in: ``W' = W + s * A @ B`` for LoRA (the variant's merge).

    Computed in float32 and cast once to each kernel's dtype, so
    ``model.apply({"params": lora.merge(params, adapters)}, x) == lora.apply(params, adapters, x)``.
    The shared frozen state of a variant (``params[STATE_KEY]``) is not part of the merged params.
    """
    model_params, state = split_state(params)
    variant_state = (state or {}).get(self.variant.name)
    return self._fold(model_params, adapters, lambda w, node, t: self.variant.merge(w, node, t, variant_state)[0])

  def unmerge(self, merged: Mapping, adapters: Mapping) -> dict:
    """The inverse of ``merge``: ``W = W' - s * A @ B`` for LoRA (float32, cast once).

    Raises:
      JloraError: the variant's merge cannot be undone from the merged kernel alone (DoRA: keep the params
        you merged, which ``merge`` left unchanged, or use ``jlora.nnx.merge``/``unmerge``).
    """
    model_params, state = split_state(merged)
    variant_state = (state or {}).get(self.variant.name)
    return self._fold(model_params, adapters, lambda w, node, t: self.variant.unmerge(w, node, t, variant_state, None))

  def _fold(self, params: Mapping, adapters: Mapping, fold: Callable) -> dict:
    targets = self.targets
    updates = {}
    for path, node in self._adapter_nodes(adapters):
      joined = _paths.join(path)
      if joined not in targets:
        raise JloraError(f"Adapter at '{joined}' is not a target of this Lora (targets: {list(targets)[:8]}...).")
      target = targets[joined]
      self._check_adapter(target, node, "in the adapter tree")
      updates[path] = fold(_paths.get(params, path), node, target)
    return _paths.replace(params, updates)

  # --- bookkeeping ------------------------------------------------------------------------------------

  def summary(self, params: Mapping, adapters: Mapping) -> Summary:
    """Trainable vs total parameters and a per-target table (``print(lora.summary(...))``)."""
    return summarize(params, adapters, self.targets, self.variant.name)

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
    for name, shape in leaf_shapes(self.variant, target).items():
      got = tuple(node[name].shape)
      if got != shape:
        raise JloraError(f"Adapter '{target.path}/{name}' {where} has shape {got}, but rank {target.rank} on this "
                         f"{target.module_type} kernel {target.stack_shape + target.layout.shape} needs "
                         f"{shape}: the adapter does not fit this model/LoraConfig (check rank/rank_pattern).")


def check_variant(config: LoraConfig, variant: Variant | None) -> Variant:
  """The variant ``config`` describes; an explicitly given one must be it (the config alone rebuilds an adapter)."""
  described = variant_for(config)
  if variant is not None and variant is not described:
    raise JloraError(f"variant={variant.name!r} was given, but the LoraConfig describes {described.name!r}: the config "
                     "selects the variant (use_dora=..., variant=...), so a saved config rebuilds the same adapter.")
  return described
