"""The module-call hook: a module whose kernel is quantized computes its output from the kernel
dequantized inside its own call.

A flax.linen module reads its kernel with ``self.param``, which only accepts an array of the declared
shape. So when an intercepted call of a supported module meets a quantized kernel, the module is run
once more, unbound, on the same inputs with its own params where the kernel is dequantized: the
module's own code computes ``base(x)``, with its own dtype, precision and dot_general. That run is a
``jax.checkpoint``: the backward pass dequantizes again instead of keeping the float kernel, so under
``nn.scan`` a float kernel exists for one layer at a time, forward and backward, and the saved state of
a step holds the quantized leaves only. Nothing is dequantized outside the compiled step.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jlora._errors import JloraError
from jlora._linen_bindings import binding_for
from jlora.quant._quantized import is_quantized

# Modules whose kernel is read inside the intercepted call itself. nn.Embed reads its table in setup(),
# before any call can swap it, and a whole vocabulary table per lookup is not what 4-bit bases are for.
_DEQUANTIZABLE = ("dense", "dense_general", "einsum", "conv")


def module_call(module: nn.Module, method: str, binding: Any, next_fun: Callable) -> Callable[..., Any]:
  """``next_fun`` for the intercepted ``module.method``, dequantizing the module's quantized kernel.

  Args:
    module: the bound module of the intercepted call.
    method: the intercepted method's name.
    binding: the module's ``jlora._linen_bindings.Binding`` (or None if jlora does not bind it).
    next_fun: the interceptor's ``next_fun``.

  Returns:
    A function of ``(*args, **kwargs)``: ``next_fun`` itself when the module holds no quantized param.

  Raises:
    JloraError (when called): a quantized param that this module does not read as a supported kernel.
  """
  params = module.variables.get("params", {}) if module.scope is not None else {}
  own = {name: value for name, value in params.items() if not isinstance(value, Mapping)}
  quantized = sorted(name for name, value in own.items() if is_quantized(value))
  if not quantized:
    return next_fun
  where = "/".join(module.path)
  if (binding is None or binding.kind not in _DEQUANTIZABLE or quantized != [binding.param]
      or method not in binding.methods):
    raise JloraError(
        f"'{where}/{quantized[0]}' is quantized, but {type(module).__name__} at '{where}' reads it in {method}(), where "
        "jlora cannot dequantize it: jlora.quant dequantizes the kernels of nn.Dense, nn.DenseGeneral, nn.Einsum and "
        "nn.Conv inside their own call. Exclude it from the targets of jlora.quant.quantize.")

  def call(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    fixed = [None if t else leaf for leaf, t in zip(leaves, traced)]
    unbound = module.clone(parent=None, name=None)

    def base(own, arrays):
      it = iter(arrays)
      call_args, call_kwargs = jax.tree.unflatten(treedef, [next(it) if t else f for t, f in zip(traced, fixed)])
      plain = {name: value.dequantize() if is_quantized(value) else value for name, value in own.items()}
      return unbound.apply({"params": plain}, *call_args, method=method, **call_kwargs)

    return jax.checkpoint(base)(own, [leaf for leaf, t in zip(leaves, traced) if t])

  return call


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  return module_call(module, context.method_name, binding_for(module), next_fun)(*args, **kwargs)


@contextlib.contextmanager
def intercept() -> Iterator[None]:
  """Context in which modules with a quantized kernel dequantize it inside their own call (no adapters).

  ``jlora.Lora.apply`` does this on its own; use this for plain inference code written against
  ``model.apply`` (e.g. ``jlora.models.generate(..., apply_fn=...)`` via ``apply_fn``).
  """
  with nn.intercept_methods(_interceptor):
    yield


def apply(model: nn.Module, params: Any, *args, collections: Mapping[str, Any] | None = None, **kwargs) -> Any:
  """``model.apply`` over params with quantized kernels, without adapters.

  Each quantized kernel is dequantized inside the call of the module that owns it. ``collections``
  passes other variable collections; ``kwargs`` go to ``model.apply`` (``rngs``, ``mutable``, ``method``).
  """
  with intercept():
    return model.apply({**(collections or {}), "params": params}, *args, **kwargs)


def apply_fn(model: nn.Module) -> Callable[..., Any]:
  """A function with ``model.apply``'s signature ``(variables, *args, **kwargs)`` for quantized params."""

  def quantized_apply(variables: Mapping, *args, **kwargs):
    with intercept():
      return model.apply(variables, *args, **kwargs)

  return quantized_apply
