"""Model surgery: give the targeted kernels of an nnx model LoRA adapters; fold them in and out.

``apply_lora`` works in place, as nnx itself does (``nnx.Optimizer.update``, ``model.train()``, nnx's
own ``LoRA`` wrappers): an nnx model is a mutable object graph, and in-place surgery keeps every
reference to a module valid, keeps shared modules shared, and never copies the frozen base. Call
``nnx.clone(model)`` first to keep an unadapted model; the clone shares the base's (immutable) arrays.
"""

import dataclasses
import re
import zlib
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import check_variant
from jlora._targets import Target, near_misses
from jlora._variant import Variant
from jlora.nnx._adapted import ATTRIBUTES, LoraModule, adapt_in_place, strip_in_place
from jlora.nnx._bindings import SUPPORTED, Binding, binding_of_class, supported_base
from jlora.nnx._param import LoraMemo, LoraParam, LoraState
from jlora.quant._quantized import is_quantized


@dataclasses.dataclass(frozen=True)
class _Plan:
  module: nnx.Module
  binding: Binding
  target: Target


def _join(path: Sequence) -> str:
  return "/".join(str(k) for k in path)


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, variant: Variant | None = None) -> list[str]:
  """Adds LoRA adapters (or the config's variant: DoRA, PiSSA/OLoRA init) to an unmodified nnx model, in place.

  Targets are ``config.targets`` regexes ``re.fullmatch``-ed against the '/'-joined paths of the
  variables in ``nnx.state(model)``, e.g. ``layers/0/attn/q_proj/kernel`` or ``embed/embedding``.
  Each targeted ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` or ``nnx.Embed``
  then computes

      y = base(x) + s * (dropout(x) @ A) @ B,      s = alpha / r   (alpha / sqrt(r) with rslora)

  with ``A`` (``lora_a``) initialised per ``config.init``, ``B`` (``lora_b``) zero, both
  ``LoraParam`` variables of ``config.dtype`` on the module beside its kernel, so the adapted model
  starts out computing exactly what it did. The config's variant adds its leaves (DoRA's
  ``lora_magnitude``); ``init="pissa"``/``"pissa_niter_K"``/``"olora"`` starts ``A``, ``B`` from the
  kernel and sets the kernel to the residual ``W - s·A@B`` (in place, like PEFT; quantized kernels are
  requantized), so the output is again unchanged. ``nnx.state(model, nnx.Param)`` is unchanged (the frozen
  base); ``nnx.state(model, LoraParam)`` is the trainable tree. Kernels with leading stacked-layer
  axes (layers created under ``nnx.vmap``) get adapters with the same leading axes.

  Adapter dropout (``config.dropout > 0``) draws from the ``rngs`` stream ``"dropout"`` (nnx falls
  back to ``"default"``) and follows nnx's train/eval switch like ``nnx.Dropout``: active while
  ``deterministic`` is False (``model.train()``), off after ``model.eval()`` or in
  ``nnx.view(model, deterministic=True)``. Adapters start in the model's current mode: eval if every
  module with a ``deterministic`` attribute is deterministic, else train (nnx's default).

  Args:
    model: the nnx model, modified in place.
    config: what to adapt and how.
    rngs: ``params`` (or ``default``) stream for ``A``; ``dropout`` stream when ``config.dropout > 0``.
    variant: optional; must be the variant the config describes (``jlora.variants.variant_for``).

  Returns:
    The '/'-joined paths of the adapted kernels, in ``nnx.state`` order.

  Raises:
    JloraError: a rule matches no variable (near misses are listed); a match is not the kernel (or
      embedding) of a supported module: a bias, another module's variable, a grouped or masked
      ``nnx.Conv``, a subclass overriding ``__call__``, an already adapted kernel; or ``rngs`` lacks
      a needed stream. Nothing is modified when it raises.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import jlora, jlora.nnx
    >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((2, 8))
    >>> y_base = model(x)
    >>> jlora.nnx.apply_lora(model, jlora.LoraConfig(targets=r"layers/\\d+/kernel", rank=2, alpha=4.0),
    ...                      rngs=nnx.Rngs(params=2))
    ['layers/0/kernel', 'layers/2/kernel']
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam)))
    {'layers': {0: {'lora_a': (8, 2), 'lora_b': (2, 16)}, 2: {'lora_a': (16, 2), 'lora_b': (2, 4)}}}
    >>> bool(jnp.array_equal(model(x), y_base))
    True
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jlora.nnx.LoraParam)  # adapters only
  """
  if not isinstance(model, nnx.Module):
    raise JloraError(f"jlora.nnx.apply_lora adapts a flax.nnx Module, got {type(model).__name__}; "
                     "for flax.linen models use jlora.Lora.")
  variant = check_variant(config, variant)
  nodes = dict(nnx.iter_graph(model))
  owned = _jlora_owned(nodes)
  variables = {path: node for path, node in nodes.items()
               if isinstance(node, nnx.Variable) and id(node) not in owned}
  paths = {_join(path): path for path in variables}
  _check_rules(config, list(paths))
  holders = _holders(nodes)
  plans = [_plan(paths[joined], nodes, variables, holders, config, variant)
           for joined in paths if config.matches(joined)]
  _adapt(plans, model, config, rngs, variant)
  return [plan.target.path for plan in plans]


def _jlora_owned(nodes: dict) -> set[int]:
  """ids of the variables jlora itself added (adapter factors, dropout rng state): never targets."""
  owned = set()
  for node in nodes.values():
    if isinstance(node, LoraParam):
      owned.add(id(node))
    elif isinstance(node, LoraModule) and "lora_rngs" in vars(node):
      owned.update(id(v) for _, v in nnx.iter_graph(node.lora_rngs) if isinstance(v, nnx.Variable))
  return owned


def _check_rules(config: LoraConfig, paths: list[str]) -> None:
  for rule in config.target_rules:
    if not any(re.fullmatch(rule, p) for p in paths):
      hint = near_misses(rule, paths)
      example = f"such as {paths[0]!r}" if paths else "(this model has none)"
      raise JloraError(
          f"LoRA target rule {rule!r} matches no variable path (rules are re.fullmatch-ed against '/'-joined "
          f"paths of nnx.state(model), {example}). "
          + (f"Near misses: {hint}." if hint else f"Some paths: {paths[:8]}."))


def _holders(nodes: dict) -> dict[int, list[str]]:
  """For every variable, the '/'-joined attribute paths of all the nodes that hold it."""
  holders: dict[int, list[str]] = {}
  for path, node in nodes.items():
    if isinstance(node, nnx.Pytree) and not isinstance(node, nnx.Variable):
      for name, value in vars(node).items():
        if isinstance(value, nnx.Variable):
          holders.setdefault(id(value), []).append(_join((*path, name)))
  return holders


def _plan(path: tuple, nodes: dict, variables: dict, holders: dict, config: LoraConfig, variant: Variant) -> _Plan:
  joined = _join(path)
  variable = variables[path]
  owner = nodes.get(path[:-1])
  name = path[-1]
  what = f"LoRA target '{joined}'"
  if isinstance(owner, LoraModule):
    raise JloraError(f"{what} already has a LoRA adapter ({type(owner).__name__}); apply_lora adapts a kernel once. "
                     "Narrow LoraConfig.targets, or start from jlora.nnx.merged_copy(model).")
  if not isinstance(owner, nnx.Module):
    raise JloraError(f"{what} is a {type(variable).__name__} inside a {type(owner).__name__}, not the kernel of a "
                     f"module; jlora adapts only the kernels of {SUPPORTED}. Narrow LoraConfig.targets.")
  binding = binding_of_class(type(owner))
  if binding is None:
    base = supported_base(type(owner))
    if base is not None:
      raise JloraError(f"{what} belongs to {type(owner).__name__}, a subclass of nnx.{base.__name__} that overrides "
                       "a method jlora adapts (__call__/attend), so jlora cannot know what it computes. Exclude it "
                       "from LoraConfig.targets.")
    raise JloraError(f"{what} is the {name!r} {type(variable).__name__} of {type(owner).__name__}; jlora adapts only "
                     f"the kernels of {SUPPORTED} (no dense fallback). Narrow LoraConfig.targets to exclude it.")
  if name != binding.param:
    raise JloraError(f"{what} is the {name!r} {type(variable).__name__} of {type(owner).__name__}; jlora adapts only "
                     f"its {binding.param!r} (no dense fallback). Narrow LoraConfig.targets to exclude it.")
  sharers = [h for h in holders.get(id(variable), []) if h != joined]
  if sharers:
    raise JloraError(f"{what} is the same variable as {sharers}; jlora cannot give a kernel shared between modules "
                     "one adapter. Tie the modules instead (use one module object), or exclude it from targets.")
  for attribute in (*variant.leaf_names, *ATTRIBUTES):
    if attribute in vars(owner):
      raise JloraError(f"{what}: {type(owner).__name__} already has an attribute {attribute!r}, which the adapter "
                       "needs; jlora will not overwrite it.")
  layout = binding.layout(owner, f"{what} ({type(owner).__name__})")
  shape = tuple(variable.shape)
  n_stack = len(shape) - len(layout.shape)
  if n_stack < 0 or shape[n_stack:] != layout.shape:
    raise JloraError(f"{what} has shape {shape} but {type(owner).__name__} expects {layout.shape}; jlora supports "
                     "stacked-layer axes only as leading axes (layers created under nnx.vmap).")
  rank = config.rank_for(joined)
  target = Target(path=joined, module_type=type(owner).__name__, kind=binding.kind, layout=layout,
                  stack_shape=shape[:n_stack], rank=rank, scale=config.scale_for(joined, rank))
  return _Plan(owner, binding, target)


def _stream(rngs: nnx.Rngs, name: str, why: str) -> nnx.RngStream:
  if not isinstance(rngs, nnx.Rngs):
    raise JloraError(f"apply_lora needs rngs=nnx.Rngs(...), got {type(rngs).__name__}.")
  try:
    return rngs[name]
  except KeyError:
    raise JloraError(f"apply_lora: rngs has no {name!r} (nor 'default') stream, needed for {why}: pass e.g. "
                     f"nnx.Rngs({name}=0).") from None


def _adapt(plans: list[_Plan], model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs, variant: Variant) -> None:
  if not plans:
    return
  key = _stream(rngs, "params", "the A factors")()
  dropout_stream = _stream(rngs, "dropout", "adapter dropout") if config.dropout > 0 else None
  deterministic = _current_mode(model)
  # Everything is computed before anything is modified: a failing init leaves the model as it was.
  reads = variant.reads_kernel or config.rewrites_base
  inits = []
  for plan in plans:
    target = plan.target
    value = getattr(plan.module, plan.binding.param).get_value()
    if is_quantized(value):  # dequantized only for a variant that reads the kernel's values
      value = value.dequantize() if reads else jax.ShapeDtypeStruct(value.shape, value.dtype)
    # Each kernel's key depends on its path only: not on order, nor on which other kernels are targeted.
    adapter, new_kernel = variant.init(jax.random.fold_in(key, zlib.crc32(target.path.encode())), target, config,
                                       value)
    inits.append((adapter, None if new_kernel is value else new_kernel))
  state = None
  if variant.init_state is not None:
    state = LoraState(variant.init_state(jax.random.fold_in(key, zlib.crc32(b"jlora:state")),
                                         {plan.target.path: plan.target for plan in plans}, config))
  for plan, (adapter, new_kernel) in zip(plans, inits):
    target, module = plan.target, plan.module
    kernel = getattr(module, plan.binding.param)
    if new_kernel is not None:
      old = kernel.get_value()
      kernel.set_value(_placed(old.requantize(new_kernel) if is_quantized(old) else new_kernel.astype(old.dtype), old))
    attributes = {name: _adapter_param(kernel, value, name, target, variant) for name, value in adapter.items()}
    attributes.update(
        lora_target=target, lora_variant=variant, lora_dropout=float(config.dropout), lora_merged=False,
        lora_memo=nnx.data(None), lora_shapes=tuple((name, tuple(value.shape)) for name, value in adapter.items()),
        deterministic=deterministic)
    if state is not None:
      attributes["lora_state"] = state
    if dropout_stream is not None:
      # Stacked layers get one stream per layer, sliced by nnx.scan/nnx.vmap like the kernel.
      stream = dropout_stream.split(target.stack_shape) if target.stack_shape else dropout_stream.fork()
      attributes["lora_rngs"] = stream
    adapt_in_place(module, plan.binding, attributes)


def _placed(new, old):
  """``new`` on the devices/sharding of ``old`` (a kernel laid out with a NamedSharding keeps it)."""
  if isinstance(getattr(old, "sharding", None), NamedSharding):
    return jax.device_put(new, old.sharding)
  return new


def _current_mode(model: nnx.Module) -> bool:
  modes = [m.deterministic for _, m in nnx.iter_modules(model) if "deterministic" in vars(m)]
  return bool(modes) and all(mode is True for mode in modes)


def _factor_axes(axes: Sequence, name: str, target: Target, variant: Variant) -> tuple | None:
  """Per-axis sharding entries of an adapter leaf, from the kernel's: each leaf axis is split like the kernel
  axis it stands for (``Variant.leaves``: A keeps the kernel's batch and input axes, B its batch and output
  axes, DoRA's magnitude its batch and output axes); rank axes are replicated."""
  leaves = variant.leaves(target)
  if name not in leaves or len(axes) != len(target.stack_shape) + len(target.layout.shape):
    return None
  n_stack = len(target.stack_shape)
  native = tuple(axes[n_stack:])
  return (*axes[:n_stack], *(None if i is None else native[i] for i in leaves[name]))


def _adapter_param(kernel: nnx.Variable, value: jax.Array, name: str, target: Target, variant: Variant) -> LoraParam:
  """``value`` as a LoraParam placed like the kernel: a kernel laid out with a NamedSharding gives the
  leaf the matching NamedSharding, and ``out_sharding`` metadata carries over the same way."""
  kernel_value = kernel.get_value()
  sharding = getattr(kernel_value, "sharding", None)
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (kernel_value.ndim - len(sharding.spec))
    factor_spec = _factor_axes(spec, name, target, variant)
    if factor_spec is not None:
      value = jax.device_put(value, NamedSharding(sharding.mesh, PartitionSpec(*factor_spec)))
  kernel_axes = kernel.get_metadata("out_sharding", None)
  if kernel_axes is None or (axes := _factor_axes(tuple(kernel_axes), name, target, variant)) is None:
    return LoraParam(value)
  metadata = {k: v for k, v in kernel.get_metadata().items() if k in ("mesh", "sharding_rules")}
  # eager_sharding=False: the factor is placed above already, and nnx must not need a mesh context here.
  return LoraParam(value, out_sharding=axes, eager_sharding=False, **metadata)


# --- merging -----------------------------------------------------------------------------------------


def _adapted_modules(model: nnx.Module, action: str) -> list[LoraModule]:
  modules = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoraModule)]
  if not modules:
    raise JloraError(f"jlora.nnx.{action}: the model has no LoRA adapters (call jlora.nnx.apply_lora first).")
  return modules


def _fold(module: LoraModule, merge: bool) -> None:
  kernel = getattr(module, type(module)._lora_binding.param)
  target, variant, state = module.lora_target, module.lora_variant, module.lora_state_value()
  old = kernel.get_value()
  if is_quantized(old):  # merged into the float kernel it stands for (jlora.quant.merge can requantize)
    old = old.dequantize()
  if merge:
    new, memo = variant.merge(old, module.lora_adapter(), target, state)
    module.lora_memo = nnx.data(None if memo is None else LoraMemo(memo))
  else:
    memo = module.lora_memo
    new = variant.unmerge(old, module.lora_adapter(), target, state, None if memo is None else memo.get_value())
    module.lora_memo = nnx.data(None)
  kernel.set_value(_placed(new, old))
  module.lora_merged = merge


def merge(model: nnx.Module) -> None:
  """Folds every adapter into its kernel, in place: ``W' = W + s * A @ B`` for LoRA (the variant's merge).

  Computed in float32 and cast once to the kernel's dtype. What the variant needs to undo it (DoRA's
  column norms) is kept on the module until ``unmerge``. Merged modules skip the adapter path, so
  the model's output is unchanged (up to that rounding); ``unmerge`` undoes it. The adapters stay
  on the model: merging is for serving, train unmerged.

  Raises:
    JloraError: the model has no adapters, or some are merged already (nothing is modified).
  """
  modules = _adapted_modules(model, "merge")
  merged = [m.lora_target.path for m in modules if m.lora_merged]
  if merged:
    raise JloraError(f"jlora.nnx.merge: adapters at {merged} are merged already; unmerge first.")
  for module in modules:
    _fold(module, merge=True)


def unmerge(model: nnx.Module) -> None:
  """The inverse of ``merge``, in place: ``W = W' - s * A @ B`` (float32, cast once).

  Raises:
    JloraError: the model has no adapters, or some are not merged (nothing is modified).
  """
  modules = _adapted_modules(model, "unmerge")
  unmerged = [m.lora_target.path for m in modules if not m.lora_merged]
  if unmerged:
    raise JloraError(f"jlora.nnx.unmerge: adapters at {unmerged} are not merged.")
  for module in modules:
    _fold(module, merge=False)


def merged_copy(model: nnx.Module) -> nnx.Module:
  """A plain nnx model with every adapter folded in; ``model`` itself is not modified.

  Every adapted module of the copy is of its original class again, with its original variables only
  (no ``LoraParam``, no adapter rng state): ``nnx.state(copy)`` has the structure of the model before
  ``apply_lora``, and ``copy(x)`` equals ``model(x)`` (in eval mode) up to float32 rounding. The copy
  shares every array that merging does not change.

  Raises:
    JloraError: the model has no adapters.
  """
  _adapted_modules(model, "merged_copy")
  copy = nnx.clone(model)
  for module in _adapted_modules(copy, "merged_copy"):
    if not module.lora_merged:
      _fold(module, merge=True)
    strip_in_place(module)
  return copy
