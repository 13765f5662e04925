"""quantize_nnx: the targeted kernels of an nnx model quantized in place.

An nnx module reads its kernel as ``self.kernel[...]``; a quantized kernel answers that with its float
value (``Quantized.__getitem__``), so the unmodified module dequantizes inside its own call, and
``jlora.nnx.apply_lora`` adapts it like any kernel (``lora_a``/``lora_b`` see the kernel's float shape).
"""

from collections.abc import Sequence
from typing import Any

from jlora._errors import JloraError
from jlora._targets import near_misses
from jlora.quant._qarray import check_format, quantize_array
from jlora.quant._quantized import is_quantized
from jlora.quant._tree import _rules

_DEQUANTIZABLE = ("linear", "linear_general", "einsum", "conv")


def quantize_nnx(model: Any, targets: str | Sequence[str], kind: str = "nf4", block_size: int = 64,
                 double_quant: bool = True) -> list[str]:
  """Quantizes the targeted kernels of an ``nnx`` model in place (see ``jlora.quant.quantize``).

  Targets are regexes ``re.fullmatch``-ed against the '/'-joined variable paths of ``nnx.state(model)``
  (``layers/0/kernel``), as in ``jlora.nnx.apply_lora``. Each must be the kernel of an ``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Einsum`` or ``nnx.Conv``. Quantize before or after ``apply_lora``; the
  adapters always see the float kernel's shape.

  Returns:
    The '/'-joined paths of the quantized kernels.

  Raises:
    JloraError: a rule matches nothing, or a match is not such a kernel (nothing is modified then).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jlora import quant
    >>> model = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    >>> quant.quantize_nnx(model, "kernel")
    ['kernel']
    >>> model(jnp.ones((1, 64))).shape
    (1, 8)
  """
  from flax import nnx

  from jlora.nnx._bindings import binding_of_class

  rules = _rules(targets)
  check_format(kind, block_size)
  nodes = dict(nnx.iter_graph(model))
  variables = {"/".join(str(k) for k in path): (path, node) for path, node in nodes.items()
               if isinstance(node, nnx.Param)}
  paths = list(variables)
  for rule in rules:
    if not any(rule.fullmatch(p) for p in paths):
      hint = near_misses(rule.pattern, paths)
      raise JloraError(f"jlora.quant.quantize_nnx: rule {rule.pattern!r} matches no nnx.Param path of the model. "
                       + (f"Near misses: {hint}." if hint else f"Some paths: {paths[:8]}."))
  chosen = []
  for joined, (path, variable) in variables.items():
    if not any(rule.fullmatch(joined) for rule in rules):
      continue
    owner = nodes.get(path[:-1])
    cls = getattr(type(owner), "_lora_base", type(owner))  # a module jlora.nnx adapted already
    binding = binding_of_class(cls) if isinstance(owner, nnx.Module) else None
    if binding is None or binding.kind not in _DEQUANTIZABLE or path[-1] != binding.param:
      raise JloraError(f"jlora.quant.quantize_nnx: '{joined}' is not the kernel of an nnx.Linear, nnx.LinearGeneral, "
                       "nnx.Einsum or nnx.Conv, the modules that dequantize their kernel inside their own call. "
                       "Narrow the targets.")
    if is_quantized(variable.get_value()):
      raise JloraError(f"jlora.quant.quantize_nnx: '{joined}' is quantized already; narrow the targets.")
    chosen.append((joined, variable))
  quantized = []
  for joined, variable in chosen:
    try:
      quantized.append(quantize_array(variable.get_value(), kind, block_size, double_quant))
    except JloraError as e:
      raise JloraError(f"jlora.quant.quantize_nnx: '{joined}': {e}") from None
  for (_, variable), value in zip(chosen, quantized):
    variable.set_value(value)
  return [joined for joined, _ in chosen]
