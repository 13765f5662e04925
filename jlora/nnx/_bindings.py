"""How each supported flax.nnx module maps onto a KernelLayout and computes its low-rank path.

The nnx counterpart of ``jlora._linen_bindings``. A binding never re-implements the frozen
computation: the module's own method still computes ``base(x)``; the binding only computes the adapter
path ``(dropout(x) @ A) @ B`` in the module's own conventions (einsum axes, conv padding/strides, the
embedding lookup). nnx modules know their kernel's shape from their attributes, so every layout is
known at surgery time, without tracing a forward pass.

Modules are recognised by their class *and* by each adapted method being flax's own, so a subclass
that overrides ``__call__`` (whose semantics jlora cannot know) is refused, never mis-adapted.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from jlora._einsum import (
  Equation,
  dense_equation,
  dense_general_equation,
  layout_from_equation,
  low_rank_einsum,
  split_equation,
)
from jlora._embedding import embedding_low_rank
from jlora._errors import JloraError
from jlora._layout import KernelLayout

Dropout = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Binding:
  """The LoRA binding of one nnx module class.

  Attributes:
    kind: short name ("linear", "linear_general", "einsum", "conv", "embed"); "embed" also selects
      the variant's embedding initialiser.
    module_type: the nnx class.
    param: attribute name of the adapted parameter.
    methods: the module methods whose output gets the adapter's contribution.
    view_shape: ``module -> shape`` of the kernel as the module sees it; extra leading axes on the
      actual parameter are stacked-layer axes (``nnx.vmap``-created layers).
    layout: ``(module, where) -> KernelLayout``; raises JloraError for configurations jlora refuses.
    low_rank: ``(module, method, args, kwargs, layout, a, b, dropout, dtype) -> y``: the adapter path
      for factors ``a``/``b`` as the module sees them, computed in ``dtype``.
  """

  kind: str
  module_type: type
  param: str
  methods: tuple[str, ...]
  view_shape: Callable[[Any], tuple[int, ...]]
  layout: Callable[[Any, str], KernelLayout]
  low_rank: Callable[..., jax.Array]


def _input(args: tuple, kwargs: dict, name: str) -> Any:
  return args[0] if args else kwargs[name]


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in axes)


def _linear_equation(module, x, args, kwargs) -> Equation:
  return dense_equation(x.ndim)


def _linear_general_equation(module, x, args, kwargs) -> Equation:
  return dense_general_equation(x.ndim, _normalize(module.axis, x.ndim), _normalize(tuple(module.batch_axis), x.ndim),
                                len(module.out_features))


def _einsum_equation(module, x, args, kwargs) -> Equation:
  equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  return split_equation(equation, f"nnx.Einsum '{module.einsum_str}'")


def _einsum_family_low_rank(equation_fn):
  def low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
    x = _input(args, kwargs, "inputs")
    equation = equation_fn(module, x, args, kwargs)
    x = dropout(jnp.asarray(x, dtype))
    return low_rank_einsum(equation, layout, x, a.astype(dtype), b.astype(dtype), module.precision)

  return low_rank


_unchecked_einsum_low_rank = _einsum_family_low_rank(_einsum_equation)


def _einsum_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  # __call__ may be given its own einsum_str; the adapter was shaped for module.einsum_str.
  equation = _einsum_equation(module, _input(args, kwargs, "inputs"), args, kwargs)
  if layout_from_equation(equation, layout.shape, "nnx.Einsum") != layout:
    lhs, rhs, out = equation
    raise JloraError(f"nnx.Einsum adapted for '{module.einsum_str}' was called with '{lhs},{rhs}->{out}', which "
                     "gives its kernel axes other roles; one adapter cannot serve both.")
  return _unchecked_einsum_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype)


def _linear_layout(module: nnx.Linear, where: str) -> KernelLayout:
  return KernelLayout((module.in_features, module.out_features), (), (0,), (1,))


def _linear_general_layout(module: nnx.LinearGeneral, where: str) -> KernelLayout:
  shape = _linear_general_shape(module)
  n_batch, n_in = len(module.batch_axis), len(module.in_features)
  return KernelLayout(shape, tuple(range(n_batch)), tuple(range(n_batch, n_batch + n_in)),
                      tuple(range(n_batch + n_in, len(shape))))


def _linear_general_shape(module: nnx.LinearGeneral) -> tuple[int, ...]:
  return (*module.batch_axis.values(), *module.in_features, *module.out_features)


def _einsum_layout(module: nnx.Einsum, where: str) -> KernelLayout:
  return layout_from_equation(split_equation(module.einsum_str, where), tuple(module.kernel_shape), where)


# --- Conv: rank-r conv with the module's own geometry, then a 1x1 up-projection -----------------


class _ConvView:
  """The module seen with a rank-r kernel: nnx.Conv.__call__ run on it convolves exactly like the
  module (padding modes, strides, dilations, batch flattening), so that logic is reused, not copied."""

  def __init__(self, module: nnx.Conv, **overrides):
    self._module = module
    self.__dict__.update(overrides)

  def __getattr__(self, name: str):
    return getattr(self._module, name)


def _conv_layout(module: nnx.Conv, where: str) -> KernelLayout:
  if module.feature_group_count != 1:
    raise JloraError(f"{where} has feature_group_count={module.feature_group_count}; jlora supports LoRA on "
                     "ungrouped convolutions only. Exclude it from LoraConfig.targets.")
  if module.mask is not None:
    raise JloraError(f"{where} has a kernel mask; jlora cannot adapt masked convolutions. Exclude it from targets.")
  shape = tuple(module.kernel_shape)
  n_spatial = len(shape) - 2
  return KernelLayout(shape, (), tuple(range(n_spatial + 1)), (n_spatial + 1,))


def _conv_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  x = dropout(jnp.asarray(_input(args, kwargs, "inputs"), dtype))
  rank = a.shape[-1]
  down = _ConvView(module, kernel=a, kernel_shape=tuple(a.shape), out_features=rank, bias=None, use_bias=False,
                   mask=None, dtype=dtype, promote_dtype=dtypes.promote_dtype,
                   conv_general_dilated=jax.lax.conv_general_dilated, preferred_element_type=None)
  h = nnx.Conv.__call__(down, x)
  return jnp.einsum("...r,ro->...o", h, b.astype(dtype), precision=module.precision)


# --- Embed: A gathered by token id; attend() is the transposed map --------------------------------


def _embed_layout(module: nnx.Embed, where: str) -> KernelLayout:
  return KernelLayout((module.num_embeddings, module.features), (), (0,), (1,))


def _embed_low_rank(module, method, args, kwargs, layout, a, b, dropout, dtype):
  attend = method == "attend"
  x = _input(args, kwargs, "query" if attend else "inputs")
  if not attend and module.num_embeddings == 1:  # nnx broadcasts its single row whatever the ids
    return jnp.broadcast_to((a.astype(dtype) @ b.astype(dtype)), (*x.shape, b.shape[-1]))
  return embedding_low_rank(attend, x, a, b, dropout, dtype)


BINDINGS: tuple[Binding, ...] = (
    Binding("linear", nnx.Linear, "kernel", ("__call__",), lambda m: (m.in_features, m.out_features),
            _linear_layout, _einsum_family_low_rank(_linear_equation)),
    Binding("linear_general", nnx.LinearGeneral, "kernel", ("__call__",), _linear_general_shape,
            _linear_general_layout, _einsum_family_low_rank(_linear_general_equation)),
    Binding("einsum", nnx.Einsum, "kernel", ("__call__",), lambda m: tuple(m.kernel_shape), _einsum_layout,
            _einsum_low_rank),
    Binding("conv", nnx.Conv, "kernel", ("__call__",), lambda m: tuple(m.kernel_shape), _conv_layout,
            _conv_low_rank),
    Binding("embed", nnx.Embed, "embedding", ("__call__", "attend"), lambda m: (m.num_embeddings, m.features),
            _embed_layout, _embed_low_rank),
)

SUPPORTED = ", ".join(f"nnx.{b.module_type.__name__}" for b in BINDINGS)


def binding_of_class(cls: type) -> Binding | None:
  """The binding of the nnx class ``cls`` derives from, if ``cls`` overrides none of its adapted methods."""
  for binding in BINDINGS:
    if issubclass(cls, binding.module_type):
      if all(getattr(cls, m) is getattr(binding.module_type, m) for m in binding.methods):
        return binding
      return None
  return None


def supported_base(cls: type) -> type | None:
  """The supported nnx class that ``cls`` subclasses, whether or not it overrides its methods."""
  return next((b.module_type for b in BINDINGS if issubclass(cls, b.module_type)), None)
