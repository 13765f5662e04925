"""The ``jlora.Call`` of one call of an adapted nnx module: what a variant may ask of the module.

The nnx counterpart of ``jlora._linen_call``, with the same laziness: the module's own (original) method
computes ``base``, the binding computes the low-rank path, and a value that must be traced through the
module's params (its bias) is traced through a view of the module that substitutes it.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora._linen_call import get_input, input_name, probe_features, with_input
from jlora._targets import Target
from jlora._variant import Call

# Output features are the output's trailing axis for these kinds (no batch axes, one output axis).
TRAILING_FEATURES = ("linear", "conv", "embed")


class _View:
  """The module with some attributes replaced; the module's own method runs on it unchanged."""

  def __init__(self, module, **overrides):
    self._module = module
    self.__dict__.update(overrides)

  def __getattr__(self, name: str):
    return getattr(self._module, name)


def nnx_call(module, method: str, original: Callable, binding, args: tuple, kwargs: dict, target: Target,
             dropout: Callable, training: bool, state: Any) -> Call:
  """The ``Call`` of the adapted ``module.method(*args, **kwargs)`` (see ``jlora._variant.Call``)."""
  name = input_name(method)
  layout = target.layout
  outputs: dict[str, Any] = {}
  # Token ids are not dropped (the lookup path takes no dropout): no dropout form for an integer input.
  training = training and jnp.issubdtype(jnp.result_type(get_input(args, kwargs, name)), jnp.floating)
  dropout = dropout if training else (lambda x: x)

  def base(transform: Callable | None = None):
    if transform is None:
      if "base" not in outputs:
        outputs["base"] = original(module, *args, **kwargs)
      out = outputs["base"]
    else:
      call_args, call_kwargs = with_input(args, kwargs, name, transform(get_input(args, kwargs, name)))
      out = original(module, *call_args, **call_kwargs)
    outputs.setdefault("dtype", out.dtype)
    outputs.setdefault("ndim", out.ndim)
    return out

  def low_rank_with(a, b, input_fn, dtype):
    return binding.low_rank(module, method, args, kwargs, layout, a, b, input_fn, dtype)

  def low_rank(a, b):
    dtype = outputs["dtype"] if "dtype" in outputs else base().dtype
    return low_rank_with(a, b, dropout, dtype)

  def kernel():
    return jnp.asarray(getattr(module, binding.param)[...])

  def features(v):
    if method == "attend":
      raise ValueError("features() of a transposed call: its output axes are the kernel's input axes.")
    if target.kind in TRAILING_FEATURES:
      ndim = outputs["ndim"] if "ndim" in outputs else base().ndim
      v = jnp.asarray(v)
      return v.reshape((1,) * (ndim - v.ndim) + v.shape)
    return probe_features(lambda a, b, input_fn: low_rank_with(a, b, input_fn, jnp.float32), layout, v)

  def bias():
    if "bias" not in outputs:
      variable = getattr(module, "bias", None)
      if variable is None:
        outputs["bias"] = 0.0
      else:
        def run(value):
          return original(_View(module, bias=value), *args, **kwargs)

        value = variable[...]
        out, outputs["bias"] = jax.jvp(run, (value,), (value,))
        outputs.setdefault("base", out)
        outputs.setdefault("dtype", out.dtype)
        outputs.setdefault("ndim", out.ndim)
    return outputs["bias"]

  return Call(target=target, method=method, transposed=method == "attend", training=training, state=state,
              base=base, low_rank=low_rank, dropout=dropout, kernel=kernel, features=features, bias=bias)
