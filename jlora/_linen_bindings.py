"""How each supported flax.linen module maps onto a KernelLayout and computes its low-rank path.

A binding never re-implements the frozen computation: the module's own method still computes
``base(x)``; the binding only computes the adapter path ``(dropout(x) @ A) @ B`` in the module's own
conventions (einsum axes, conv padding/strides, embedding lookup). Modules are recognised by their
class *and* by the method being flax's own implementation, so a subclass that overrides ``__call__``
(whose semantics jlora cannot know) is refused instead of being silently mis-adapted.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum

from jlora._einsum import Equation, dense_equation, dense_general_equation, layout_from_equation, low_rank_einsum
from jlora._embedding import embedding_low_rank
from jlora._errors import JloraError
from jlora._layout import KernelLayout

Dropout = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Binding:
  """The LoRA binding of one module class.

  Attributes:
    kind: short name shown in summaries ("dense", "einsum", "conv", "embed").
    param: name of the adapted parameter of the module.
    methods: the module methods whose output gets the adapter's contribution.
    layout: ``(module, method, args, kwargs, kernel_shape) -> KernelLayout``.
    low_rank: ``(module, method, args, kwargs, layout, a, b, dropout, dtype) -> y``: the adapter path
      for factors ``a``/``b`` (already sliced to the module's view), in compute dtype ``dtype``.
  """

  kind: str
  param: str
  methods: tuple[str, ...]
  layout: Callable[..., KernelLayout]
  low_rank: Callable[..., jax.Array]


def _input(args: tuple, kwargs: dict, name: str) -> Any:
  return args[0] if args else kwargs[name]


# --- Dense, DenseGeneral, Einsum: one einsum-shaped family ---------------------------------------


def _canon(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _equation(module, method, args, kwargs, kernel_shape) -> Equation:
  x = _input(args, kwargs, "inputs")
  if isinstance(module, nn.Einsum):
    equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    # opt_einsum's parser expands any ellipsis into letters, as flax's own bias logic does.
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
        (equation.replace(" ", ""), np.empty(x.shape, np.int8), np.empty(kernel_shape, np.int8)))
    lhs, rhs = operands.split(",")
    return lhs, rhs, out
  if isinstance(module, nn.DenseGeneral):
    n = x.ndim
    return dense_general_equation(n, tuple(a % n for a in _canon(module.axis)),
                                  tuple(b % n for b in _canon(module.batch_dims)), len(_canon(module.features)))
  return dense_equation(x.ndim)


def _where(module) -> str:
  return f"{type(module).__name__} at '{'/'.join(module.path)}'"


def _einsum_layout(module, method, args, kwargs, kernel_shape) -> KernelLayout:
  return layout_from_equation(_equation(module, method, args, kwargs, kernel_shape), kernel_shape, _where(module))


def _einsum_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  equation = _equation(module, method, args, kwargs, layout.shape)
  x = dropout(jnp.asarray(_input(args, kwargs, "inputs"), dtype))
  return low_rank_einsum(equation, layout, x, a.astype(dtype), b.astype(dtype), module.precision)


# --- Conv: rank-r conv with the module's own geometry, then a 1x1 up-projection -----------------


def _conv_layout(module: nn.Conv, method, args, kwargs, kernel_shape) -> KernelLayout:
  where = _where(module)
  if module.feature_group_count != 1:
    raise JloraError(f"{where} has feature_group_count={module.feature_group_count}; jlora supports LoRA on "
                     "ungrouped convolutions only. Exclude it from LoraConfig.targets.")
  if module.mask is not None:
    raise JloraError(f"{where} has a kernel mask; jlora cannot adapt masked convolutions. Exclude it from targets.")
  n_spatial = len(kernel_shape) - 2
  return KernelLayout(tuple(kernel_shape), (), tuple(range(n_spatial + 1)), (n_spatial + 1,))


def _conv_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  x = dropout(jnp.asarray(_input(args, kwargs, "inputs"), dtype))
  # The same convolution (padding, strides, dilation, batch handling) with r output channels.
  down = module.clone(parent=None, name=None, features=a.shape[-1], use_bias=False, dtype=dtype)
  h = down.apply({"params": {"kernel": a.astype(dtype)}}, x)
  return jnp.einsum("...r,ro->...o", h, b.astype(dtype), precision=module.precision)


# --- Embed: A gathered by token id; attend() is the transposed map --------------------------------


def _embed_layout(module: nn.Embed, method, args, kwargs, kernel_shape) -> KernelLayout:
  return KernelLayout(tuple(kernel_shape), (), (0,), (1,))


def _embed_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  attend = method == "attend"
  return embedding_low_rank(attend, _input(args, kwargs, "query" if attend else "inputs"), a, b, dropout, dtype)


_EINSUM_FAMILY = dict(param="kernel", methods=("__call__",), layout=_einsum_layout, low_rank=_einsum_low_rank)
_BINDINGS: tuple[tuple[type, Binding], ...] = (
    (nn.Dense, Binding(kind="dense", **_EINSUM_FAMILY)),
    (nn.DenseGeneral, Binding(kind="dense_general", **_EINSUM_FAMILY)),
    (nn.Einsum, Binding(kind="einsum", **_EINSUM_FAMILY)),
    (nn.Conv, Binding("conv", "kernel", ("__call__",), _conv_layout, _conv_low_rank)),
    (nn.Embed, Binding("embed", "embedding", ("__call__", "attend"), _embed_layout, _embed_low_rank)),
)

SUPPORTED = ", ".join(f"nn.{cls.__name__}" for cls, _ in _BINDINGS)


def binding_for(module: nn.Module) -> Binding | None:
  """The binding of ``module``'s class, or None if jlora does not know how to adapt it."""
  for cls, binding in _BINDINGS:
    if isinstance(module, cls) and all(getattr(type(module), m) is getattr(cls, m) for m in binding.methods):
      return binding
  return None
