"""Adapter-only checkpoints through orbax, with the LoRA config and base fingerprint as metadata."""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jlora._config import LoraConfig
from jlora._errors import JloraError

_METADATA = "jlora_adapter.json"
_FORMAT = "jlora-adapter/1"


def save_adapters(path: str | os.PathLike, adapters: Mapping, config: LoraConfig, *,
                  base_fingerprint: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
  """Writes ``adapters`` (orbax, under ``path/adapters``) and ``path/jlora_adapter.json``.

  Args:
    path: a new directory.
    adapters: the adapter tree (possibly sharded; orbax writes from every host).
    config: the LoraConfig the adapters were trained with.
    base_fingerprint: ``jlora.fingerprint(params)`` of the base model, checked on load.
    extra: more JSON-serialisable metadata (e.g. training step, base model path).
  """
  path = os.path.abspath(os.fspath(path))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "adapters"), adapters)
  if jax.process_index() == 0:
    metadata = {"format": _FORMAT, "lora_config": config.to_dict(), "base_fingerprint": base_fingerprint,
                "extra": dict(extra or {})}
    with open(os.path.join(path, _METADATA), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)


def load_adapter_metadata(path: str | os.PathLike) -> dict:
  """The metadata of a saved adapter: ``lora_config`` (a LoraConfig), ``base_fingerprint``, ``extra``."""
  file = os.path.join(os.fspath(path), _METADATA)
  try:
    with open(file) as f:
      metadata = json.load(f)
  except FileNotFoundError:
    raise JloraError(f"{file} not found: {os.fspath(path)!r} is not a jlora adapter directory.") from None
  except json.JSONDecodeError as e:
    raise JloraError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
    raise JloraError(f"{file}: unknown adapter format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
                     f"expected {_FORMAT!r}.")
  metadata["lora_config"] = LoraConfig.from_dict(metadata["lora_config"])
  return metadata


def load_adapters(path: str | os.PathLike, target: Mapping, *, base_fingerprint: str | None = None
                  ) -> tuple[dict, LoraConfig]:
  """Restores an adapter saved by ``save_adapters``.

  Args:
    path: the directory given to ``save_adapters``.
    target: the expected adapter tree as arrays or ``jax.ShapeDtypeStruct`` (with ``sharding`` to
      restore straight onto a mesh), e.g. ``jax.eval_shape(lora.init, key, params, x)``. The saved
      tree must have exactly this structure, shapes and dtypes.
    base_fingerprint: if given, must equal the fingerprint stored at save time (when one was stored).

  Returns:
    ``(adapters, config)``.

  Raises:
    JloraError: missing/invalid metadata, a base-model mismatch, or a tree that does not match ``target``.
  """
  metadata = load_adapter_metadata(path)
  stored = metadata["base_fingerprint"]
  if base_fingerprint is not None and stored is not None and stored != base_fingerprint:
    raise JloraError(f"Adapter at {os.fspath(path)!r} was trained on a different base model "
                     f"(fingerprint {stored}, this base {base_fingerprint}).")
  abstract = jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                    sharding=getattr(x, "sharding", None)),
      target)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(os.path.join(os.path.abspath(os.fspath(path)), "adapters"))
    saved_tree = getattr(saved, "item_metadata", saved)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), dict(saved_tree))
    if want != got:
      raise JloraError(f"Adapter at {os.fspath(path)!r} does not match the expected tree:\n saved:    {got}\n "
                       f"expected: {want}")
    adapters = checkpointer.restore(os.path.join(os.path.abspath(os.fspath(path)), "adapters"), abstract)
  return adapters, metadata["lora_config"]
