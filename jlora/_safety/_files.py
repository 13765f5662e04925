"""File-level checks shared by every load path: size caps, pickle refusal, strict JSON."""

import json
import os
import pathlib
from typing import Any

from jlora._safety._errors import UnsafeAdapterError

# Extensions of pickled checkpoints (torch.save, pickle.dump, joblib); jlora never reads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def pickle_kind(head: bytes) -> str | None:
  """What a file that starts with ``head`` is, if it is a pickle or a torch.save zip archive."""
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
    return f"a pickle (protocol {head[1]})"
  if head.startswith(b"PK\x03\x04"):
    return "a zip archive (torch.save's pickle container)"
  return None


def refuse_pickle_name(path: pathlib.Path) -> None:
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise UnsafeAdapterError(f"{path} is a pickled checkpoint ({path.suffix}); jlora never unpickles. "
                             "Re-save it as safetensors (e.g. peft's save_pretrained(..., safe_serialization=True)).")


def checked_size(path: pathlib.Path, max_bytes: int, what: str) -> int:
  """The size of regular file ``path``; refuses pickle names and files over ``max_bytes``."""
  refuse_pickle_name(path)
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    raise UnsafeAdapterError(f"{what} {path} does not exist.") from None
  except OSError as e:
    raise UnsafeAdapterError(f"{what} {path} cannot be read: {e}.") from None
  if not path.is_file():
    raise UnsafeAdapterError(f"{what} {path} is not a regular file.")
  if size > max_bytes:
    raise UnsafeAdapterError(f"{what} {path} is {size:,} bytes, over the {max_bytes:,}-byte cap "
                             "(LoadPolicy.max_file_bytes / max_json_bytes).")
  return size


def read_bytes(path: pathlib.Path, max_bytes: int, what: str) -> bytes:
  """The whole (small) file, after checking its size against ``max_bytes`` before reading."""
  checked_size(path, max_bytes, what)
  with open(path, "rb") as f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:  # grew between stat and read
    raise UnsafeAdapterError(f"{what} {path} is over the {max_bytes:,}-byte cap.")
  kind = pickle_kind(data[:4])
  if kind is not None:
    raise UnsafeAdapterError(f"{what} {path} is {kind}; jlora never unpickles.")
  return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def _no_constants(name: str):
  raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes, where: str) -> Any:
  """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity literals."""
  try:
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise UnsafeAdapterError(f"{where} is not valid JSON: {e}") from None


def read_json(path: str | os.PathLike, max_bytes: int, what: str) -> Any:
  """Reads and strictly parses a small JSON file."""
  path = pathlib.Path(path)
  return parse_json(read_bytes(path, max_bytes, what), str(path))
