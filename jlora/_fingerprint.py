"""A cheap, deterministic fingerprint of a base model's params, stored with every exported adapter."""

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _paths
from jlora.quant import is_quantized

_SAMPLES = 1024


def fingerprint(params: Mapping) -> str:
  """SHA-256 over every leaf's path, shape, dtype and up to 1024 evenly strided values.

  Enough to tell one checkpoint from another (a fine-tuned or differently initialised base differs in
  sampled values; another architecture in shapes) without hashing billions of parameters. Sampling
  reads a small strided slice of each array, so sharded params are not gathered whole.

  A quantized kernel (``jlora.quant``: NF4/FP4/int8, GGUF blocks) is fingerprinted by what it stores: its
  type and format (kind, block size, GGUF type), the float kernel's shape and dtype, and the strided
  samples of each stored array (codes and statistics). Nothing is dequantized, so the fingerprint does
  not depend on how a compiler rounds a dequantization on one platform or another. A quantized base
  therefore has a fingerprint of its own, different from the float checkpoint it was quantized from
  (and from that checkpoint's dequantized copy): an adapter trained over NF4 weights learnt around their
  quantization error, and loading it onto the float weights is a different base, which the check
  refuses unless told otherwise. Quantization is deterministic, so such an adapter is checked against
  its float checkpoint with ``base_fingerprint=jlora.fingerprint(jlora.quant.quantize(params, targets,
  ...))`` (the targets and settings it was trained with; for a GGUF file, the params of
  ``from_pretrained(path, quantized="keep")``).

  Example:
    >>> import numpy as np, jlora
    >>> a = jlora.fingerprint({"w": np.ones((4, 4), np.float32)})
    >>> a == jlora.fingerprint({"w": np.ones((4, 4), np.float32)}), a == jlora.fingerprint({"w": np.zeros((4, 4), np.float32)})
    (True, False)
    >>> from jlora import quant
    >>> w = {"w": np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8)}
    >>> jlora.fingerprint(quant.quantize(w, "w")) == jlora.fingerprint(quant.quantize(w, "w"))
    True
    >>> jlora.fingerprint(quant.quantize(w, "w")) in (jlora.fingerprint(w), jlora.fingerprint(quant.quantize(w, "w", "fp4")))
    False
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(_paths.iter_leaves(params), key=lambda item: item[0]):
    digest.update(f"{_paths.join(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype).name}|".encode())
    if not is_quantized(leaf):
      digest.update(np.ascontiguousarray(_sample(leaf)).tobytes())
      continue
    digest.update(f"{_format(leaf)}|".encode())
    for keypath, stored in jax.tree_util.tree_leaves_with_path(leaf):
      digest.update(f"{jax.tree_util.keystr(keypath)}|{tuple(stored.shape)}|{np.dtype(stored.dtype).name}|".encode())
      digest.update(np.ascontiguousarray(_sample(stored)).tobytes())
  return "sha256:" + digest.hexdigest()


def _format(leaf: Any) -> str:
  """A quantized kernel's type and static fields (its format), e.g. ``GgufBlocks(ggml_type='q4_1', ...)``."""
  if not dataclasses.is_dataclass(leaf):
    return f"{type(leaf).__name__}{jax.tree.structure(leaf)}"
  static = [(field.name, getattr(leaf, field.name)) for field in dataclasses.fields(leaf)
            if field.metadata.get("static")]
  shown = ", ".join(f"{name}={value.name if isinstance(value, np.dtype) else repr(value)}" for name, value in static)
  return f"{type(leaf).__name__}({shown})"


def _sample(leaf) -> np.ndarray:
  size = int(np.prod(leaf.shape))
  stride = max(1, size // _SAMPLES)
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # Other hosts hold parts of this array: gather only the strided sample, replicated to every host.
    replicated = NamedSharding(leaf.sharding.mesh, PartitionSpec())
    sample = jax.jit(lambda x: x.reshape(-1)[::stride][:_SAMPLES], out_shardings=replicated)(leaf)
    return np.asarray(sample.addressable_data(0))
  return np.asarray(jax.device_get(leaf.reshape(-1)[::stride][:_SAMPLES]))
