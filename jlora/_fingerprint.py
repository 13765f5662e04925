"""A cheap, deterministic fingerprint of a base model's params, stored with every exported adapter."""

import hashlib
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _paths

_SAMPLES = 1024


def fingerprint(params: Mapping) -> str:
  """SHA-256 over every leaf's path, shape, dtype and up to 1024 evenly strided values.

  Enough to tell one checkpoint from another (a fine-tuned or differently initialised base differs in
  sampled values; another architecture in shapes) without hashing billions of parameters. Sampling
  reads a small strided slice of each array, so sharded params are not gathered whole.

  Example:
    >>> import numpy as np, jlora
    >>> a = jlora.fingerprint({"w": np.ones((4, 4), np.float32)})
    >>> a == jlora.fingerprint({"w": np.ones((4, 4), np.float32)}), a == jlora.fingerprint({"w": np.zeros((4, 4), np.float32)})
    (True, False)
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(_paths.iter_leaves(params)):
    sample = _sample(leaf)
    digest.update(f"{_paths.join(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype).name}|".encode())
    digest.update(np.ascontiguousarray(sample).tobytes())
  return "sha256:" + digest.hexdigest()


def _sample(leaf) -> np.ndarray:
  size = int(np.prod(leaf.shape))
  stride = max(1, size // _SAMPLES)
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # Other hosts hold parts of this array: gather only the strided sample, replicated to every host.
    replicated = NamedSharding(leaf.sharding.mesh, PartitionSpec())
    sample = jax.jit(lambda x: x.reshape(-1)[::stride][:_SAMPLES], out_shardings=replicated)(leaf)
    return np.asarray(sample.addressable_data(0))
  return np.asarray(jax.device_get(leaf.reshape(-1)[::stride][:_SAMPLES]))
