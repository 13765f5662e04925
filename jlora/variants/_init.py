"""How ``A`` and ``B`` start: random ``A`` and zero ``B`` (the identity), or PiSSA/OLoRA's factors of ``W``.

PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) start from the kernel's principal directions and
train them, leaving the *residual* ``W - s·A@B`` frozen, so the adapted output at init is the base's. The
maths follows PEFT's ``pissa_init``/``olora_init`` on the torch weight ``W^T`` (``(fan_out, fan_in)``), one
matrix per stacked layer and batch slice of the kernel (see ``_kernel_math.matricize``):

* ``"pissa"``: ``W^T = V S U^T`` (full SVD), ``A = (U_r sqrt(S_r / s))``, ``B = sqrt(S_r / s) V_r^T``;
* ``"pissa_niter_K"``: the same from a randomized SVD (Halko et al.'s algorithm 4.4, ``torch.svd_lowrank``
  with ``q = r``) with ``K`` subspace iterations, its Gaussian test matrix drawn from the init key;
* ``"olora"``: ``W^T = Q R`` (reduced QR), ``A = R_r^T``, ``B = Q_r^T`` (no division by ``s``).
"""

import jax
import jax.numpy as jnp

from jlora._config import is_base_rewriting, niter_of
from jlora._errors import JloraError
from jlora._targets import Target
from jlora.variants._kernel_math import from_matrix, matricize

__all__ = ["is_base_rewriting", "kernel_factors", "random_factors"]


def random_factors(key: jax.Array, target: Target, init: str, dtype) -> tuple[jax.Array, jax.Array]:
  """``A`` random (per ``init``), ``B`` zero: an adapter that changes nothing at first."""
  layout, rank = target.layout, target.rank
  a_shape = target.stack_shape + layout.a_shape(rank)
  b_shape = target.stack_shape + layout.b_shape(rank)
  if target.kind == "embed":
    # The input is a one-hot row, so fan-in scaling would make A vanish; PEFT draws its embedding
    # factor from N(0, 1) for the same reason.
    lora_a = jax.random.normal(key, a_shape, dtype)
  elif init == "gaussian":
    lora_a = jax.random.normal(key, a_shape, dtype) / rank
  else:
    # torch's kaiming_uniform_(a=sqrt(5)) as PEFT uses it: bound = sqrt(6 / ((1 + 5) * fan_in)).
    bound = 1.0 / jnp.sqrt(float(layout.fan_in))
    lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
  return lora_a, jnp.zeros(b_shape, dtype)


def kernel_factors(key: jax.Array, target: Target, init: str, kernel: jax.Array, dtype
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(A, B, W - s·A@B)`` for a base-rewriting ``init``; the residual in float32.

  The residual is formed from ``A`` and ``B`` as stored (in ``dtype``), so ``residual + s·A@B`` is ``W``
  up to float32 rounding whatever the adapter dtype.
  """
  layout, rank, scale = target.layout, target.rank, target.scale
  w_t = jnp.swapaxes(matricize(jnp.asarray(kernel, jnp.float32), layout), -1, -2)  # PEFT's (fan_out, fan_in)
  fan_out, fan_in = w_t.shape[-2:]
  if rank > min(fan_in, fan_out):
    raise JloraError(f"init={init!r} on '{target.path}': rank {rank} exceeds min(fan_in, fan_out) = "
                     f"{min(fan_in, fan_out)} of the kernel {layout.shape}; lower the rank (rank_pattern).")
  if init == "olora":
    q, r = jnp.linalg.qr(w_t)
    b_t, a_t = q[..., :, :rank], r[..., :rank, :]
  else:
    niter = niter_of(init)
    if niter is None:
      v, s, uh = jnp.linalg.svd(w_t, full_matrices=False)
    else:
      v, s, uh = _svd_lowrank(key, w_t, rank, niter)
    root = jnp.sqrt(s[..., :rank] / scale)
    a_t = root[..., :, None] * uh[..., :rank, :]
    b_t = v[..., :, :rank] * root[..., None, :]
  lead = target.stack_shape + tuple(layout.shape[i] for i in layout.batch_axes)
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  out_shape = tuple(layout.shape[i] for i in layout.out_axes)
  lora_a = jnp.swapaxes(a_t, -1, -2).reshape(lead + in_shape + (rank,)).astype(dtype)
  lora_b = jnp.swapaxes(b_t, -1, -2).reshape(lead + (rank,) + out_shape).astype(dtype)
  product = jnp.einsum("...ir,...ro->...io", lora_a.reshape(lead + (fan_in, rank)).astype(jnp.float32),
                       lora_b.reshape(lead + (rank, fan_out)).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  residual = jnp.swapaxes(w_t, -1, -2) - scale * product
  return lora_a, lora_b, from_matrix(residual, layout)


def _svd_lowrank(key: jax.Array, matrix: jax.Array, rank: int, niter: int):
  """Rank-``rank`` randomized SVD of a batch of ``(m, n)`` matrices: ``(U, S, V^T)``, as ``torch.svd_lowrank``."""
  def mm(x, y):
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)

  n = matrix.shape[-1]
  test = jax.random.normal(key, matrix.shape[:-2] + (n, rank), matrix.dtype)
  basis, _ = jnp.linalg.qr(mm(matrix, test))
  for _ in range(niter):
    basis, _ = jnp.linalg.qr(mm(jnp.swapaxes(matrix, -1, -2), basis))
    basis, _ = jnp.linalg.qr(mm(matrix, basis))
  u, s, vh = jnp.linalg.svd(mm(jnp.swapaxes(basis, -1, -2), matrix), full_matrices=False)
  return mm(basis, u), s, vh
