"""``jlora._einsum.low_rank_einsum``: the low-rank path ``(x @ A) @ B`` of every linear-map equation.

Plain matmuls over trailing axes run on 2-D operands (one ``(tokens, d_in)`` matrix), everything else as N-D
einsums; both must give numpy's ``einsum`` of the full-rank product ``A @ B`` and the same gradients as the
N-D einsum formulation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora._einsum import (
  dense_equation,
  layout_from_equation,
  low_rank_einsum,
  nd_low_rank_einsum,
  split_equation,
)

RANK = 3

CASES = {  # name: (equation, input shape, kernel shape)
    "dense_3d": ("btd,do->bto", (2, 5, 4), (4, 6)),
    "dense_2d": ("td,do->to", (5, 4), (4, 6)),
    "two_in_two_out": ("bij,ijkl->bkl", (2, 3, 4), (3, 4, 2, 5)),  # DenseGeneral((2, 5), axis=(-2, -1))
    "heads": ("btd,ndh->btnh", (2, 5, 4), (3, 4, 2)),  # out axes in kernel order: the 2-D form applies
    "heads_reordered": ("btd,dnh->bnth", (2, 5, 4), (4, 3, 2)),  # output not free + out: stays an einsum
    "kernel_batch": ("nbd,ndo->nbo", (3, 5, 4), (3, 4, 6)),  # per-head kernels: stays an einsum
}


def _factors(layout, key):
  batch = [layout.shape[i] for i in layout.batch_axes]
  ins = [layout.shape[i] for i in layout.in_axes]
  outs = [layout.shape[i] for i in layout.out_axes]
  ka, kb = jax.random.split(key)
  return (jax.random.normal(ka, (*batch, *ins, RANK)), jax.random.normal(kb, (*batch, RANK, *outs)))


@pytest.mark.parametrize("name", CASES)
def test_low_rank_path_equals_numpy_and_the_nd_einsum_gradients(name):
  text, x_shape, kernel_shape = CASES[name]
  equation = split_equation(text, name)
  layout = layout_from_equation(equation, kernel_shape, name)
  x = jax.random.normal(jax.random.key(0), x_shape)
  a, b = _factors(layout, jax.random.key(1))

  got = low_rank_einsum(equation, layout, x, a, b)
  # numpy reference: the full-rank kernel A @ B laid out as the equation's kernel, then the equation itself
  lhs, rhs, out = equation
  kb = "".join(rhs[i] for i in layout.batch_axes)
  kin = "".join(rhs[i] for i in layout.in_axes)
  kout = "".join(rhs[i] for i in layout.out_axes)
  kernel = np.einsum(f"{kb}{kin}z,{kb}z{kout}->{rhs}", np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(got, np.einsum(text, np.asarray(x), kernel), rtol=1e-5, atol=1e-5)

  cotangent = jax.random.normal(jax.random.key(2), got.shape)
  grads = jax.grad(lambda *v: jnp.vdot(low_rank_einsum(equation, layout, *v), cotangent), argnums=(0, 1, 2))
  reference = jax.grad(lambda *v: jnp.vdot(nd_low_rank_einsum(equation, layout, *v), cotangent), argnums=(0, 1, 2))
  for g, r in zip(grads(x, a, b), reference(x, a, b), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_dense_equation_is_a_trailing_matmul():
  assert dense_equation(3) == ("abc", "cd", "abd")
