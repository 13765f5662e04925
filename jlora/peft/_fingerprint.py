"""A fingerprint of a base model that survives the trip through Hugging Face formats.

``jlora.fingerprint`` hashes a params tree as it is, so stacking layers (``scan_layers``) or loading
in bfloat16 changes it. An adapter exported to PEFT may be loaded into either layout and precision,
so the fingerprint stored in its safetensors metadata is taken over the Hugging Face tensor names,
per-layer slices and values rounded to bfloat16.

A quantized kernel (``jlora.quant``: NF4/FP4/int8, GGUF blocks) is fingerprinted by what it stores, as
``jlora.fingerprint`` does: its format and, per layer, samples of its codes and statistics, never the float
weights it dequantizes to. A quantized base thus differs from the float checkpoint it came from.
"""

import dataclasses
import hashlib
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from jlora import _paths
from jlora.models._name_maps import name_map
from jlora.quant import is_quantized

_SAMPLES = 1024
METADATA_KEY = "jlora_base_fingerprint"


def base_fingerprint(model, params: Mapping) -> str:
  """SHA-256 over each Hugging Face tensor's name, shape and 1024 strided values rounded to bfloat16.

  Independent of ``scan_layers`` and of float32/bfloat16 params, so ``jlora.peft.from_pretrained``
  can check an exported adapter against its base however that base was loaded.

  A quantized kernel (``jlora.quant``) contributes its format (type and block layout, not the dtype it
  dequantizes to) and, per layer, each stored array's shape, dtype and 1024 strided values as stored (codes
  and block statistics; a stacked kernel's layers are its stored arrays' leading slices, so ``scan_layers``
  still does not matter). Nothing is dequantized: like ``jlora.fingerprint``, an adapter trained over a
  quantized base is checked against that base, not against the float weights it was quantized from.

  Args:
    model: a ``jlora.models`` module (its config gives the name map).
    params: its params tree.

  Example:
    >>> import dataclasses, jax, jax.numpy as jnp, numpy as np, jlora.peft
    >>> from jlora import models
    >>> config = models.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    >>> model = models.GPT2LMHeadModel(config)
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> params = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(np.float32), shapes)
    >>> unrolled = models.GPT2LMHeadModel(dataclasses.replace(config, scan_layers=False))
    >>> flat = {f"h_{i}": jax.tree.map(lambda x: x[i], params["transformer"]["h"]) for i in range(2)}
    >>> unrolled_params = {"transformer": {**{k: v for k, v in params["transformer"].items() if k != "h"}, **flat}}
    >>> jlora.peft.base_fingerprint(model, params) == jlora.peft.base_fingerprint(unrolled, unrolled_params)
    True
  """
  config = model.config
  names = name_map(config)
  samples: dict[str, tuple[tuple[int, ...], bytes]] = {}
  for rule in names.rules:
    if rule.per_layer and config.scan_layers:
      leaf = _paths.get(params, tuple(rule.param_path.replace("_{i}", "").split("/")))
      layers = _layer_samples(leaf, names.num_layers)
      for i in range(names.num_layers):
        samples[rule.hf_name.format(i=i)] = (tuple(leaf.shape[1:]), layers[i])
      continue
    for i in range(names.num_layers) if rule.per_layer else [None]:
      leaf = _paths.get(params, tuple(rule.param_path.format(i=i).split("/")))
      samples[rule.hf_name.format(i=i)] = (tuple(leaf.shape), _layer_samples(leaf, 1)[0])
  digest = hashlib.sha256()
  for hf_name, (shape, sample) in sorted(samples.items()):
    digest.update(f"{hf_name}|{shape}|".encode())
    digest.update(sample)
  return "sha256:" + digest.hexdigest()


def _layer_samples(leaf, rows: int) -> list[bytes]:
  """What each of ``rows`` layers of ``leaf`` contributes: its float samples rounded to bfloat16, or a quantized
  kernel's format and the samples of each stored array's layer slice, as stored."""
  if not is_quantized(leaf):
    return [np.ascontiguousarray(_rounded(sample)).tobytes() for sample in _sample_rows(leaf, rows)]
  parts = [[f"{_format(leaf)}|".encode()] for _ in range(rows)]
  for keypath, stored in jax.tree_util.tree_leaves_with_path(leaf):
    header = f"{jax.tree_util.keystr(keypath)}|{tuple(stored.shape[1:] if rows > 1 else stored.shape)}|"
    header += f"{np.dtype(stored.dtype).name}|"
    for part, sample in zip(parts, _sample_rows(stored, rows)):
      part += [header.encode(), np.ascontiguousarray(sample).tobytes()]
  return [b"".join(part) for part in parts]


def _format(leaf) -> str:
  """A quantized kernel's type and static fields except the dtype it dequantizes to (float32 or bfloat16 params
  of one base fingerprint alike), e.g. ``QuantizedArray(kind='nf4', block_size=64, kernel_shape=(576, 576))``."""
  static = [(field.name, getattr(leaf, field.name)) for field in dataclasses.fields(leaf)
            if field.metadata.get("static") and field.name != "dtype"]
  return f"{type(leaf).__name__}({', '.join(f'{name}={value!r}' for name, value in static)})"


def _rounded(sample: np.ndarray) -> np.ndarray:
  return sample.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _sample_rows(leaf, rows: int) -> np.ndarray:
  """Up to 1024 evenly strided values of each of ``rows`` equal slices of ``leaf`` (one device op)."""
  size = int(np.prod(leaf.shape)) // rows
  stride = max(1, size // _SAMPLES)
  if isinstance(leaf, np.ndarray):
    return leaf.reshape(rows, -1)[:, ::stride][:, :_SAMPLES]
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # Other hosts hold parts of this array: compute only the strided sample, replicated to every host.
    replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    sample = jax.jit(lambda x: x.reshape(rows, -1)[:, ::stride][:, :_SAMPLES], out_shardings=replicated)(leaf)
    return np.asarray(sample.addressable_data(0))
  return np.asarray(jax.device_get(leaf.reshape(rows, -1)[:, ::stride][:, :_SAMPLES]))
