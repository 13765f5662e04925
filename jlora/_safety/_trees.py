"""Checks on an in-memory adapter tree: allowed dtypes and finite values, leaf by leaf."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._safety._errors import UnsafeAdapterError

ALLOWED_NAMES = ("float16", "bfloat16", "float32")


def check_dtypes(tree: Mapping, source: str) -> None:
  """Every leaf's dtype is float16, bfloat16 or float32 (works on ``ShapeDtypeStruct`` trees too)."""
  bad = [f"{_paths.join(path)} ({np.dtype(leaf.dtype).name})" for path, leaf in _paths.iter_leaves(tree)
         if np.dtype(leaf.dtype).name not in ALLOWED_NAMES]
  if bad:
    raise UnsafeAdapterError(f"Adapter {source} has leaves of a dtype other than {'/'.join(ALLOWED_NAMES)}: "
                             f"{bad[:8]}.")


def check_finite(tree: Mapping, source: str) -> None:
  """Every value of every leaf is finite (reduced on device, so sharded leaves are not gathered)."""
  leaves = list(_paths.iter_leaves(tree))
  if all(_on_host(leaf) for _, leaf in leaves):  # numpy or CPU arrays: no compilation, no copy
    counts = [int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf)))) for _, leaf in leaves]
  else:
    counts = jax.device_get(_count_non_finite([leaf for _, leaf in leaves]))
  bad = [f"{_paths.join(path)} ({int(count)} values)" for (path, _), count in zip(leaves, counts) if count]
  if bad:
    raise UnsafeAdapterError(f"Adapter {source} holds NaN/inf values in {bad[:8]}.")


@jax.jit
def _count_non_finite(leaves: list) -> list:
  # One compiled reduction for the whole tree rather than one per leaf shape.
  return [jnp.sum(~jnp.isfinite(jnp.asarray(leaf, jnp.float32))) for leaf in leaves]


def _on_host(leaf) -> bool:
  if isinstance(leaf, np.ndarray):
    return True
  return (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
          and all(device.platform == "cpu" for device in leaf.devices()))


def to_host(leaf) -> np.ndarray:
  """The whole value of ``leaf`` as a numpy array, gathering from other hosts when it is sharded across them."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))
