"""Rank-``k`` LoRA factors of a dense update by truncated SVD, with PEFT's quantile clamp.

PEFT's ``add_weighted_adapter`` (the ``*_svd`` combination types) decomposes each module's combined
update in PyTorch's ``(out, in)`` orientation, ``M = U S V^T``, and keeps ``B = U_k S_k`` and
``A = V_k^T``; with ``svd_clamp = q`` both factors are then clipped to ``[-h, h]``, ``h`` being the
``q``-quantile of all entries of the two factors together. jlora does the same per layer (and per
kernel-batch slice), over the leading axes of a batch of ``(out, in)`` matrices.

The SVD leaves the sign of each singular pair arbitrary, and the clamp is not invariant to it (it
looks at the values, not at ``B @ A``). jlora fixes the signs so that the largest-magnitude entry of
each left singular vector is positive, so the clamped factors do not depend on which LAPACK or
cuSOLVER routine ran.
"""

import jax
import jax.numpy as jnp

from jlora._errors import JloraError

# svd_driver values: jax's algorithm names, and PEFT's cuSOLVER names where jax runs the same method.
SVD_DRIVERS = {
    None: None,
    "qr": jax.lax.linalg.SvdAlgorithm.QR,
    "divide_and_conquer": jax.lax.linalg.SvdAlgorithm.DIVIDE_AND_CONQUER,
    "jacobi": jax.lax.linalg.SvdAlgorithm.JACOBI,
    "polar": jax.lax.linalg.SvdAlgorithm.POLAR,
    "gesvd": jax.lax.linalg.SvdAlgorithm.QR,
    "gesvdj": jax.lax.linalg.SvdAlgorithm.JACOBI,
}


def svd_algorithm(driver: str | None) -> jax.lax.linalg.SvdAlgorithm | None:
  """The ``jax.lax.linalg.SvdAlgorithm`` for an ``svd_driver`` name (None: jax's default for the device)."""
  if driver not in SVD_DRIVERS:
    raise JloraError(f"svd_driver={driver!r} is not one of {sorted(k for k in SVD_DRIVERS if k)} or None "
                     "(PEFT's cuSOLVER 'gesvda' has no jax equivalent).")
  return SVD_DRIVERS[driver]


def canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flips singular pairs so the largest-magnitude entry of each column of ``u`` is positive."""
  rows = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(u, rows, axis=-2))
  sign = jnp.where(sign == 0, 1, sign)
  return u * sign, vh * jnp.swapaxes(sign, -1, -2)


def truncated_factors(m_out_in: jax.Array, rank: int, *, clamp: float | None = None, n_stack: int = 0,
                      algorithm: jax.lax.linalg.SvdAlgorithm | None = None) -> tuple[jax.Array, jax.Array]:
  """``(A, B)`` of rank ``rank`` with ``A @ B`` the best rank-``rank`` approximation of ``m_out_in^T``.

  Args:
    m_out_in: ``(..., out, in)`` matrices (PyTorch's orientation, in which PEFT decomposes).
    rank: the new rank ``k``. When a matrix has fewer than ``k`` singular values (``min(out, in) < k``),
      the factors are zero-padded to ``k``: the product is still exact.
    clamp: PEFT's ``svd_clamp`` quantile, or None.
    n_stack: leading axes that are separate modules (stacked layers): each gets its own clamp
      threshold; the axes after them (kernel-batch slices) share one.
    algorithm: the ``jax.lax.linalg.SvdAlgorithm``, or None for the default.

  Returns:
    ``a_in_k`` ``(..., in, k)`` and ``b_k_out`` ``(..., k, out)``, jlora's factor orientation.
  """
  u, s, vh = jax.lax.linalg.svd(m_out_in, full_matrices=False, algorithm=algorithm)
  u, vh = canonical_signs(u, vh)
  kept = min(rank, s.shape[-1])
  b_out_k = u[..., :kept] * s[..., None, :kept]
  a_k_in = vh[..., :kept, :]
  if clamp is not None:
    lead = m_out_in.shape[:n_stack]
    values = jnp.concatenate([b_out_k.reshape(lead + (-1,)), a_k_in.reshape(lead + (-1,))], axis=-1)
    high = jnp.quantile(values, clamp, axis=-1).reshape(lead + (1,) * (m_out_in.ndim - n_stack))
    b_out_k = jnp.clip(b_out_k, -high, high)
    a_k_in = jnp.clip(a_k_in, -high, high)
  pad = [(0, 0)] * (m_out_in.ndim - 1) + [(0, rank - kept)]
  return jnp.pad(jnp.swapaxes(a_k_in, -1, -2), pad), jnp.swapaxes(jnp.pad(b_out_k, pad), -1, -2)
