"""Reductions of several task tensors into one: task arithmetic, TIES, DARE and magnitude pruning.

These are the reductions of PEFT's ``add_weighted_adapter`` (``peft.utils.merge_utils``), as pure jax
functions over a list of same-shaped tensors ``t_i`` with weights ``w_i``:

* ``task_arithmetic``: ``sum_i w_i t_i``.
* ``magnitude_prune``: each ``t_i`` keeps its ``int(density * n)`` largest-magnitude entries, then
  ``sum_i w_i t_i``.
* ``ties``: magnitude pruning, then a sign election per entry (``"total"``: the sign of ``sum_i t_i``;
  ``"frequency"``: the sign held by more tensors; ties go to +), then the disjoint mean: the weighted
  entries that agree with the elected sign, summed and divided by how many agree (at least 1).
* ``dare_linear`` / ``dare_ties``: like ``task_arithmetic`` / ``ties`` but each entry is kept with
  probability ``density`` (a Bernoulli draw from a jax key) and rescaled by ``1 / density``, so the
  expectation of every pruned tensor is the tensor itself.

The sign election sees the pruned, unweighted tensors (as in PEFT); the weights enter afterwards.
Pruning is per layer: a tensor has ``n_stack`` leading stacked-layer (``nn.scan``) axes and each layer
keeps its own top-``k``, as each per-layer module does in PEFT.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

REDUCTIONS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def magnitude_prune(tensor: jax.Array, density: float, n_stack: int = 0) -> jax.Array:
  """Keeps the ``int(density * n)`` largest ``|values|`` of each stacked layer (``n`` entries each), zeros the rest."""
  if density >= 1.0:
    return tensor
  flat = tensor.reshape(tensor.shape[:n_stack] + (-1,))
  k = int(density * flat.shape[-1])
  if k == 0:
    return jnp.zeros_like(tensor)
  _, keep = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool)
  rows = jnp.indices(keep.shape)[:-1]
  mask = mask.at[(*rows, keep)].set(True)
  return jnp.where(mask, flat, 0).reshape(tensor.shape)


def random_prune(key: jax.Array, tensor: jax.Array, density: float) -> jax.Array:
  """DARE's drop-and-rescale: each entry kept with probability ``density``, kept entries divided by it."""
  if density >= 1.0:
    return tensor
  # A flat draw: partitionable threefry compiles several times faster on CPU for 1-D shapes than for N-D ones.
  keep = jax.random.bernoulli(key, density, (tensor.size,)).reshape(tensor.shape)
  return jnp.where(keep, tensor / density, 0).astype(tensor.dtype)


def majority_sign_mask(stacked: jax.Array, method: str) -> jax.Array:
  """Per entry, whether each tensor (axis 0) has the elected sign; zero entries never do."""
  sign = jnp.sign(stacked)
  magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
  elected = jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)
  return sign == elected[None]


def disjoint_merge(weighted: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean over axis 0 of the entries where ``mask`` holds (at least one in the denominator)."""
  total = jnp.where(mask, weighted, 0).sum(axis=0)
  return total / jnp.maximum(mask.sum(axis=0), 1).astype(weighted.dtype)


def reduce(reduction: str, tensors: Sequence[jax.Array], weights: jax.Array, *, density: float | None = None,
           sign_method: str = "total", key: jax.Array | None = None, n_stack: int = 0) -> jax.Array:
  """One of ``REDUCTIONS`` over same-shaped ``tensors`` with ``weights`` (one per tensor).

  Args:
    reduction: ``"task_arithmetic"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or ``"magnitude_prune"``.
    tensors: the task tensors.
    weights: their weights, shape ``(len(tensors),)``.
    density: the kept fraction for the pruning reductions.
    sign_method: ``"total"`` or ``"frequency"``, for the TIES sign election.
    key: the PRNG key for DARE; one draw covers all tensors, so each entry of each tensor is kept
      independently.
    n_stack: leading stacked-layer axes; magnitude pruning keeps its top-k per tensor and layer.

  Returns:
    The reduced tensor, shaped like each input.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora._combine_reductions import reduce
    >>> t = [jnp.array([1.0, -2.0, 3.0]), jnp.array([-4.0, -1.0, 0.5])]
    >>> reduce("ties", t, jnp.array([1.0, 1.0]), density=2 / 3)
    Array([-4. , -1.5,  3. ], dtype=float32)
  """
  stacked = jnp.stack(tensors)
  if reduction in ("ties", "magnitude_prune"):
    stacked = magnitude_prune(stacked, density, n_stack + 1)
  elif reduction in ("dare_linear", "dare_ties"):
    stacked = random_prune(key, stacked, density)
  weighted = stacked * weights.astype(stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
  if reduction in ("ties", "dare_ties"):
    return disjoint_merge(weighted, majority_sign_mask(stacked, sign_method))
  return weighted.sum(axis=0)
