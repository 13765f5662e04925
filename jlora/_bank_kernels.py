"""The low-rank path of a mixed batch: every row with its own adapter's factors, two ways.

* **BGMV** (gather per row, Punica's batched gather matrix-vector): each row gathers its slot's ``A`` and
  ``B`` and one batched einsum computes ``(x_b @ A_b) @ B_b`` for all rows at once. Work and memory traffic
  do not depend on how many distinct adapters the batch holds.
* **SGMV** (rows grouped by adapter, segmented gather matrix-vector): the batch's tokens are sorted by slot and
  ``jax.lax.ragged_dot`` does one matmul per group against the stacked factors, then the rows are put back.

On this repository's 2-core CPU (jax 0.10), BGMV is the faster of the two in both phases: in a micro-benchmark
of one projection (16 rows, 16 slots, d=576, rank 8) BGMV took about 0.12 ms against SGMV's 0.35 ms in decode and
0.6 ms against 70-100 ms in prefill (64 tokens per row), because XLA's CPU ``ragged_dot`` lowers to a loop over
groups that does not vectorise, and a per-slot masked matmul loop (another SGMV form) costs a full matmul per slot.
On whole model steps (``python -m tools.bench --suite full --only bank``, ``docs/benchmarks.md``) SGMV/BGMV was
1.76 in prefill and 1.18 in decode. So ``choose`` picks BGMV for decode and prefill alike on CPU; SGMV stays
available (``AdapterBank(kernel="sgmv")``) for backends whose grouped matmul is native.

Conventions: ``a_rows``/``b_rows`` carry a leading row axis before the module's factor layout
(``a: batch + in + (r,)``, ``b: batch + (r,) + out``); stacked slot factors carry a leading slot axis.
"""

import string
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jlora._einsum import Equation
from jlora._errors import JloraError
from jlora._layout import KernelLayout

KERNELS = ("bgmv", "sgmv")
# Per phase, from the measurements above: (decode: one token per row, prefill: several).
CPU_CHOICE = {"decode": "bgmv", "prefill": "bgmv"}


def choose(kernel: str | None, tokens_per_row: int) -> str:
  """The kernel for a call: ``kernel`` when forced, else the measured choice for the phase."""
  return CPU_CHOICE["decode" if tokens_per_row <= 1 else "prefill"] if kernel is None else kernel


def row_letter(equation: Equation, where: str) -> str:
  """The einsum letter of the example (row) axis: the input's leading axis, which must lead the output too and
  not be a kernel axis."""
  lhs, rhs, out = equation
  row = lhs[0]
  if row in rhs or not out or out[0] != row:
    raise JloraError(f"{where}: the bank gives each row (the input's leading axis) its own adapter, but "
                     f"'{lhs},{rhs}->{out}' uses that axis as a kernel axis or does not lead the output with it.")
  return row


def bgmv_einsum(equation: Equation, layout: KernelLayout, x: jax.Array, a_rows: jax.Array, b_rows: jax.Array,
                precision=None) -> jax.Array:
  """``(x @ A_b) @ B_b`` per row for a Dense / DenseGeneral / Einsum call (BGMV)."""
  lhs, rhs, out = equation
  row = lhs[0]
  rank = next(c for c in string.ascii_letters if c not in lhs + rhs + out)
  kb = "".join(rhs[i] for i in layout.batch_axes)
  kin = "".join(rhs[i] for i in layout.in_axes)
  kout = "".join(rhs[i] for i in layout.out_axes)
  h = "".join(c for c in out if c not in kout) + rank
  h_val = jnp.einsum(f"{lhs},{row}{kb}{kin}{rank}->{h}", x, a_rows, precision=precision)
  return jnp.einsum(f"{h},{row}{kb}{rank}{kout}->{out}", h_val, b_rows, precision=precision)


def sgmv_dense(x: jax.Array, a_s: jax.Array, b_s: jax.Array, slot_b: jax.Array, coef_b: jax.Array,
               precision=None) -> jax.Array:
  """``coef_b * (x_b @ A_{slot_b}) @ B_{slot_b}`` for an ``nn.Dense`` call, rows grouped by slot (SGMV).

  Args:
    x: ``(B, ..., in)``.
    a_s: ``(S, in, r)``; b_s: ``(S, r, out)``.
    slot_b: int ``(B,)`` in ``[0, S)``.
    coef_b: ``(B,)`` per-row factor (the slot's scale, 0 for a row without adapter).
  """
  batch, n_slots = x.shape[0], a_s.shape[0]
  per_row = x.shape[1:-1]
  tokens = x.reshape(-1, x.shape[-1])
  n_tokens = tokens.shape[0] // batch
  slot_t = jnp.repeat(slot_b, n_tokens)
  order = jnp.argsort(slot_t, stable=True)
  group_sizes = jnp.bincount(slot_t, length=n_slots).astype(jnp.int32)
  h = jax.lax.ragged_dot(tokens[order], a_s.astype(x.dtype), group_sizes, precision=precision)
  h = h * jnp.repeat(coef_b, n_tokens)[order][:, None].astype(h.dtype)
  y_sorted = jax.lax.ragged_dot(h, b_s.astype(x.dtype), group_sizes, precision=precision)
  y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  return y.reshape((batch,) + per_row + (b_s.shape[-1],))


def embed_lookup_rows(ids: jax.Array, a_s: jax.Array, b_rows: jax.Array, slot_b: jax.Array, dtype) -> jax.Array:
  """``A_{slot_b}[ids_b] @ B_b`` for an embedding lookup: rows gather only their tokens' rows of ``A``."""
  h = a_s[slot_b.reshape((-1,) + (1,) * (ids.ndim - 1)), ids].astype(dtype)
  return jnp.einsum("b...r,bro->b...o", h, b_rows.astype(dtype))


def generic_rows(low_rank: Callable, x: jax.Array, a_rows: jax.Array, b_rows: jax.Array) -> jax.Array:
  """``low_rank(x_b[None], A_b, B_b)[0]`` per row, vectorised (conv, a tied embedding's ``attend``)."""
  return jax.vmap(lambda x1, a1, b1: low_rank(x1[None], a1, b1)[0])(x, a_rows, b_rows)
