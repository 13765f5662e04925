"""The ``jlora.Call`` of one intercepted flax.linen module call: what a variant may ask of the module.

Everything is lazy and evaluated at most once per call; a LoRA call evaluates only ``base()`` and
``low_rank``. Nothing here knows a particular module class: it uses the module's own method (through the
interceptor's ``base``, which dequantizes a quantized kernel), the binding's ``low_rank`` and ``layout``,
and a functional re-run of the module (``clone().apply``) where a value must be traced through its params.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._targets import Target
from jlora._variant import Call
from jlora.quant._quantized import is_quantized

# Output features are the output's trailing axis for these kinds: no batch axes, one output axis (nn.Dense
# contracts the input's last axis, nn.Conv is NHWC, nn.Embed's lookup ends in its features). DenseGeneral and
# Einsum place them by their equation, which the probe follows.
TRAILING_FEATURES = ("dense", "conv", "embed")


def input_name(method: str) -> str:
  """The name of the input argument of a bound module method (``attend`` takes a ``query``)."""
  return "query" if method == "attend" else "inputs"


def with_input(args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
  """``(args, kwargs)`` with the module's input (first positional, else the keyword ``name``) replaced."""
  if args:
    return (value, *args[1:]), kwargs
  return args, {**kwargs, name: value}


def get_input(args: tuple, kwargs: dict, name: str) -> Any:
  return args[0] if args else kwargs[name]


def probe_features(low_rank: Callable, layout, v: jax.Array) -> jax.Array:
  """``v`` (``batch + out``) placed like the module's output features, through the low-rank path itself.

  ``low_rank(a, b, input=ones)`` with a one-hot ``a`` of rank 1 computes exactly ``1.0 * b`` at every output
  position, so ``b = v`` comes out where the module puts each feature (any einsum, any axis order). Run at
  float32 precision: a bf16/TF32 product would round ``v``.
  """
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  a = jnp.zeros(batch + (layout.fan_in, 1), jnp.float32).at[..., 0, 0].set(1.0).reshape(batch + in_shape + (1,))
  b = jnp.expand_dims(jnp.asarray(v, jnp.float32), len(batch))
  with jax.default_matmul_precision("highest"):
    return low_rank(a, b, jnp.ones_like)


def memo(fn: Callable[[], Any]) -> Callable[[], Any]:
  cache = []

  def once():
    if not cache:
      cache.append(fn())
    return cache[0]

  return once


def linen_call(module: nn.Module, method: str, binding, base: Callable, args: tuple, kwargs: dict, target: Target,
               dropout: Callable, training: bool, state: Any) -> Call:
  """The ``Call`` of ``module.method(*args, **kwargs)`` with adapter ``target`` (see ``jlora._variant.Call``)."""
  name = input_name(method)
  layout = target.layout
  outputs: dict[str, Any] = {}
  # Token ids are not dropped (the lookup path takes no dropout): no dropout form for an integer input.
  training = training and jnp.issubdtype(jnp.result_type(get_input(args, kwargs, name)), jnp.floating)
  dropout = dropout if training else (lambda x: x)

  def low_rank_with(a, b, input_fn, dtype):
    return binding.low_rank(module, method, args, kwargs, layout, a, b, input_fn, dtype)

  def base_call(transform: Callable | None = None):
    if transform is None:
      if "base" not in outputs:
        outputs["base"] = base(*args, **kwargs)
      out = outputs["base"]
    else:
      # A compact linen method can run once per call (its params are claimed): further runs are functional.
      call_args, call_kwargs = with_input(args, kwargs, name, transform(get_input(args, kwargs, name)))
      out = functional(module, method)(own_params(module), *call_args, **call_kwargs)
    outputs.setdefault("dtype", out.dtype)
    outputs.setdefault("ndim", out.ndim)
    return out

  def low_rank(a, b):
    # The adapter path computes in the module's output dtype (known once any base output is).
    dtype = outputs["dtype"] if "dtype" in outputs else base_call().dtype
    return low_rank_with(a, b, dropout, dtype)

  def kernel():
    value = module.get_variable("params", binding.param)
    return value.dequantize() if is_quantized(value) else jnp.asarray(value)

  def features(v):
    if method == "attend":
      raise ValueError("features() of a transposed call: its output axes are the kernel's input axes.")
    if target.kind in TRAILING_FEATURES:
      ndim = outputs["ndim"] if "ndim" in outputs else base_call().ndim
      v = jnp.asarray(v)
      return v.reshape((1,) * (ndim - v.ndim) + v.shape)
    return probe_features(lambda a, b, input_fn: low_rank_with(a, b, input_fn, jnp.float32), layout, v)

  def bias():
    if "bias" not in outputs:
      outputs["bias"] = _bias(module, method, args, kwargs, outputs)
    return outputs["bias"]

  return Call(target=target, method=method, transposed=method == "attend", training=training, state=state,
              base=base_call, low_rank=low_rank, dropout=dropout, kernel=kernel, features=features, bias=bias)


def _bias(module: nn.Module, method: str, args: tuple, kwargs: dict, outputs: dict) -> Any:
  """The module's bias as added to its output: the tangent of the module's output along its own bias.

  The module is re-run functionally as ``f(bias)``; ``jax.jvp(f, (bias,), (bias,))`` gives ``f(bias)`` (the
  module's output, kept as ``base()``) and the bias placed where the module adds it, at the cost of one
  product: the kernel product has a zero tangent, which JAX never computes.
  """
  own = own_params(module)
  if "bias" not in own:
    return 0.0
  apply = functional(module, method)

  def run(bias):
    return apply({**own, "bias": bias}, *args, **kwargs)

  out, placed = jax.jvp(run, (own["bias"],), (own["bias"],))
  outputs.setdefault("base", out)
  outputs.setdefault("dtype", out.dtype)
  outputs.setdefault("ndim", out.ndim)
  return placed


def own_params(module: nn.Module) -> dict:
  """The module's own params (not its submodules', nor jlora's adapter slots)."""
  return {k: v for k, v in module.variables.get("params", {}).items() if not isinstance(v, Mapping)}


def functional(module: nn.Module, method: str) -> Callable:
  """``(params, *args, **kwargs) -> y``: the module's method re-run on given params, as a fresh unbound module.

  Run inside the interceptor's context, so a quantized kernel in ``params`` is dequantized as in the module's
  own call; with no adapter slot in ``params``, no adapter is added.
  """
  unbound = module.clone(parent=None, name=None)

  def run(params, *args, **kwargs):
    return unbound.apply({"params": params}, *args, method=method, **kwargs)

  return run
