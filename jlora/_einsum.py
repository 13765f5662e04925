"""Linear maps written as two-operand einsums ``lhs,rhs->out`` (input, kernel): axis roles and the
low-rank path. Framework-neutral: the linen and nnx bindings both describe Dense-like modules this way.
"""

import math
import string

import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora._layout import KernelLayout

Equation = tuple[str, str, str]


def dense_equation(ndim: int) -> Equation:
  """``x @ W`` over the last input axis."""
  xs = string.ascii_letters[:ndim]
  out_letter = string.ascii_letters[ndim]
  return xs, xs[-1] + out_letter, xs[:-1] + out_letter


def dense_general_equation(ndim: int, axis: tuple[int, ...], batch: tuple[int, ...], n_features: int) -> Equation:
  """``lax.dot_general`` as flax's DenseGeneral/LinearGeneral use it: kernel ``batch + in + features``,
  output ``batch + free input axes + features``. ``axis``/``batch`` are normalised input axes."""
  xs = string.ascii_letters[:ndim]
  fs = string.ascii_letters[ndim : ndim + n_features]
  rhs = "".join(xs[b] for b in batch) + "".join(xs[a] for a in axis) + fs
  free = "".join(xs[i] for i in range(ndim) if i not in axis and i not in batch)
  return xs, rhs, "".join(xs[b] for b in batch) + free + fs


def split_equation(equation: str, where: str) -> Equation:
  """``"lhs,rhs->out"`` into its three subscripts (no ellipsis in the kernel)."""
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise JloraError(f"{where}: einsum {equation!r} is not of the form 'lhs,rhs->out'.")
  operands, out = equation.split("->")
  lhs, rhs = operands.split(",")
  if "." in rhs:
    raise JloraError(f"{where}: kernel subscripts {rhs!r} use an ellipsis; jlora needs every kernel axis named.")
  return lhs, rhs, out


def layout_from_equation(equation: Equation, shape: tuple[int, ...], where: str) -> KernelLayout:
  """Kernel axis roles: in all three operands -> batch; input and kernel -> in; kernel and output -> out."""
  lhs, rhs, out = equation
  if len(set(rhs)) != len(rhs):
    raise JloraError(f"{where}: kernel subscripts {rhs!r} repeat a letter (a diagonal); jlora cannot factor "
                     "such a kernel.")
  if len(rhs) != len(shape):
    raise JloraError(f"{where}: kernel subscripts {rhs!r} do not match the kernel shape {tuple(shape)}.")
  roles: dict[str, list[int]] = {"batch": [], "in": [], "out": []}
  for axis, letter in enumerate(rhs):
    if letter in lhs and letter in out:
      roles["batch"].append(axis)
    elif letter in lhs:
      roles["in"].append(axis)
    elif letter in out:
      roles["out"].append(axis)
    else:
      raise JloraError(f"{where}: kernel axis {letter!r} of '{lhs},{rhs}->{out}' is summed away without meeting "
                       "the input; jlora cannot factor it.")
  if not roles["in"] or not roles["out"]:
    raise JloraError(f"{where}: '{lhs},{rhs}->{out}' has no contracted or no output kernel axis, so it is not a "
                     "low-rank-factorable linear map.")
  return KernelLayout(tuple(shape), tuple(roles["batch"]), tuple(roles["in"]), tuple(roles["out"]))


def low_rank_einsum(equation: Equation, layout: KernelLayout, x: jax.Array, a: jax.Array, b: jax.Array,
                    precision=None) -> jax.Array:
  """``(x @ A) @ B`` in the equation's own conventions: ``A: batch + in + (r,)``, ``B: batch + (r,) + out``.

  The rank-space activation keeps the output's non-kernel axes, so the result has ``out``'s layout.

  When the map is a plain matrix product over trailing axes (no kernel batch axes; the input is
  ``free + in``, the output ``free + out``, in that order), the two products run on 2-D operands
  (``x`` as ``(tokens, d_in)``): the same sums, but XLA then differentiates two 2-D matmuls, while the
  N-D einsum's backward transposes every output gradient in memory before the ``B`` gradient (XLA:CPU
  materialises one ``[out, tokens]`` copy per adapted module, measured in ``docs/benchmarks.md``).
  """
  lhs, rhs, out = equation
  kin = "".join(rhs[i] for i in layout.in_axes)
  kout = "".join(rhs[i] for i in layout.out_axes)
  free = lhs[: len(lhs) - len(kin)]
  if not layout.batch_axes and lhs == free + kin and out == free + kout:
    n_in = a.ndim - 1
    x2 = x.reshape((-1, math.prod(x.shape[x.ndim - n_in:])))
    h = jnp.matmul(x2, a.reshape((-1, a.shape[-1])), precision=precision)
    y = jnp.matmul(h, b.reshape((b.shape[0], -1)), precision=precision)
    return y.reshape(x.shape[: x.ndim - n_in] + b.shape[1:])
  return nd_low_rank_einsum(equation, layout, x, a, b, precision)


def nd_low_rank_einsum(equation: Equation, layout: KernelLayout, x: jax.Array, a: jax.Array, b: jax.Array,
                       precision=None) -> jax.Array:
  """``(x @ A) @ B`` as two N-D einsums: ``x @ A`` keeps every non-kernel axis of the output.

  Any equation; :func:`low_rank_einsum` uses it for those its 2-D form does not cover.
  """
  lhs, rhs, out = equation
  rank = next(c for c in string.ascii_letters if c not in lhs + rhs + out)
  kb = "".join(rhs[i] for i in layout.batch_axes)
  kin = "".join(rhs[i] for i in layout.in_axes)
  kout = "".join(rhs[i] for i in layout.out_axes)
  h = "".join(c for c in out if c not in kout) + rank
  h_val = jnp.einsum(f"{lhs},{kb}{kin}{rank}->{h}", x, a, precision=precision)
  return jnp.einsum(f"{h},{kb}{rank}{kout}->{out}", h_val, b, precision=precision)
