"""Seeded mutations of an adapter directory: bytes anywhere in any file, and edits of its JSON documents.

A mutation picks a *region* of the directory (see ``regions``), then an operator allowed there:

* bytes (every region): flip one bit, overwrite 1-4 bytes, truncate the file, insert 1-16 bytes,
  delete 1-16 bytes, at a position drawn uniformly inside the region;
* JSON (``adapter_config.json``, ``jlora_adapter.json``, orbax's JSON metadata files, and the safetensors
  header, whose ``__metadata__`` object is its own region): delete a key, rename a key, add a key,
  change a value's type, edit a value; the header is re-encoded with a correct length prefix, so the
  edit reaches the checks behind the JSON parser;
* manifest (``SHA256SUMS``): drop, duplicate or swap lines, point a line elsewhere, upper-case a digest,
  switch to ``sha256sum``'s binary marker.

Every mutation changes at least one byte; the description says exactly what changed.
"""

import dataclasses
import json
import pathlib
import re

import numpy as np

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
METADATA, MANIFEST = "jlora_adapter.json", "SHA256SUMS"
_ORBAX_JSON = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding", "array_metadatas/process_0")


@dataclasses.dataclass(frozen=True)
class Region:
  """A byte range of one file of an adapter directory: ``file`` (relative path) and ``[begin, end)``.

  ``kind`` says what the bytes are: ``length`` (the safetensors length prefix), ``header`` and
  ``metadata`` (the safetensors JSON header outside / inside ``__metadata__``), ``data`` (tensor
  bytes), ``config`` (adapter_config.json / jlora_adapter.json), ``orbax-json``, ``orbax-binary``,
  ``manifest``.
  """

  name: str
  file: str
  kind: str
  begin: int
  end: int


def _safetensors_regions(directory: pathlib.Path) -> list[Region]:
  data = (directory / WEIGHTS).read_bytes()
  length = int.from_bytes(data[:8], "little")
  header = data[8:8 + length]
  start = header.index(b'"__metadata__"')
  end = header.index(b"}", start) + 1  # the metadata object holds only strings without braces
  return [Region("safetensors length prefix", WEIGHTS, "length", 0, 8),
          Region("safetensors header before __metadata__", WEIGHTS, "header", 8, 8 + start),
          Region("safetensors __metadata__", WEIGHTS, "metadata", 8 + start, 8 + end),
          Region("safetensors header after __metadata__", WEIGHTS, "header", 8 + end, 8 + length),
          Region("safetensors tensor data", WEIGHTS, "data", 8 + length, len(data))]


def regions(directory: pathlib.Path, kind: str) -> list[Region]:
  """Every region of a pristine ``kind`` ("peft" or "jlora") directory, covering every byte of every file."""
  found = []
  if kind == "peft":
    found += _safetensors_regions(directory)
    found.append(Region(CONFIG, CONFIG, "config", 0, (directory / CONFIG).stat().st_size))
  else:
    found.append(Region(METADATA, METADATA, "config", 0, (directory / METADATA).stat().st_size))
    for path in sorted((directory / "adapters").rglob("*")):
      if path.is_file():
        relative = path.relative_to(directory).as_posix()
        json_file = relative.removeprefix("adapters/") in _ORBAX_JSON
        found.append(Region(relative, relative, "orbax-json" if json_file else "orbax-binary", 0, path.stat().st_size))
  if (directory / MANIFEST).exists():
    found.append(Region(MANIFEST, MANIFEST, "manifest", 0, (directory / MANIFEST).stat().st_size))
  return [region for region in found if region.end > region.begin]


# --- bytes ---------------------------------------------------------------------------------------------


def _byte_mutation(data: bytes, region: Region, rng: np.random.Generator) -> tuple[str, bytes]:
  position = int(rng.integers(region.begin, region.end))
  operator = str(rng.choice(["flip", "flip", "overwrite", "truncate", "insert", "delete"]))
  if operator == "flip":
    bit = int(rng.integers(0, 8))
    mutated = bytearray(data)
    mutated[position] ^= 1 << bit
    return f"flip bit {bit} of byte {position}", bytes(mutated)
  if operator == "overwrite":
    count = min(int(rng.integers(1, 5)), len(data) - position)
    new = rng.bytes(count)
    return f"overwrite bytes {position}..{position + count} with {new.hex()}", data[:position] + new + data[
        position + count:]
  if operator == "truncate":
    return f"truncate to {position} bytes", data[:position]
  if operator == "insert":
    new = rng.bytes(int(rng.integers(1, 17)))
    return f"insert {new.hex()} at byte {position}", data[:position] + new + data[position:]
  count = int(rng.integers(1, 17))
  return f"delete bytes {position}..{position + count}", data[:position] + data[position + count:]


# --- JSON ----------------------------------------------------------------------------------------------


def _paths(node, prefix=()) -> list[tuple]:
  """Every key path of a JSON document (object keys and list indices), depth first."""
  found = []
  if isinstance(node, dict):
    for key, value in node.items():
      found.append((*prefix, key))
      found += _paths(value, (*prefix, key))
  elif isinstance(node, list):
    for index, value in enumerate(node):
      found.append((*prefix, index))
      found += _paths(value, (*prefix, index))
  return found


def _get(node, path):
  for key in path:
    node = node[key]
  return node


_EDITS = [0, 1, -1, 2, 3, 7, 0.5, 1e308, -0.0, 2**63, "", "x", ".*", "(", "q_proj", "LORA", True, False, None, [], {},
          [1, 2], {"a": 1}, "sha256:" + "0" * 64, "F16", "I64", "pt", "np"]


def _retyped(value, rng: np.random.Generator):
  """The same value in another JSON type (or a neighbouring value of the same type)."""
  if isinstance(value, bool):
    return int(value) if rng.random() < 0.5 else str(value).lower()
  if isinstance(value, int):
    return [float(value), str(value), value + 1, value - 1, [value], None][int(rng.integers(0, 6))]
  if isinstance(value, float):
    return [int(value) if value.is_integer() else round(value), str(value), value * 2, None][int(rng.integers(0, 4))]
  if isinstance(value, str):
    choices = [value + "x", value[:-1], value.upper(), [value], None, 1]
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
      choices.append(float(value))
    return choices[int(rng.integers(0, len(choices)))]
  if isinstance(value, list):
    return [value[:-1], value + value[-1:], {str(i): v for i, v in enumerate(value)}, None, value[::-1]][
        int(rng.integers(0, 5))]
  if isinstance(value, dict):
    return [list(value.values()), None, {}, {**value, "extra": 1}][int(rng.integers(0, 4))]
  return [0, "null", False][int(rng.integers(0, 3))]


def json_mutation(document, rng: np.random.Generator, within: tuple = ()) -> tuple[str, object]:
  """A copy of ``document`` with one edit at or below the key path ``within``."""
  document = json.loads(json.dumps(document))
  paths = [p for p in _paths(document) if p[:len(within)] == within and len(p) > len(within)]
  operator = str(rng.choice(["delete", "rename", "add", "retype", "edit"]))
  if operator == "add" or not paths:
    objects = [p for p in [within, *paths] if isinstance(_get(document, p), dict)]
    where = objects[int(rng.integers(0, len(objects)))]
    name = str(rng.choice(["extra", "__metadata__", "format", "peft_type", "r", "lora_config", "targets", "dtype",
                           "jlora_base_fingerprint"]))
    value = _EDITS[int(rng.integers(0, len(_EDITS)))]
    _get(document, where)[name] = value
    return f"set key {name!r} = {value!r} in the object at {list(where)}", document
  path = paths[int(rng.integers(0, len(paths)))]
  parent, key = _get(document, path[:-1]), path[-1]
  if operator == "delete":
    del parent[key]
    return f"delete {list(path)}", document
  if operator == "rename" and isinstance(parent, dict):
    new_key = str(rng.choice([key + "_", key[:-1] or "k", key.upper(), "jlora_base_fingerprint", "format"]))
    new_key = key + "_" if new_key == key else new_key
    items = [(new_key if k == key else k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(dict(items))
    return f"rename key {list(path)} to {new_key!r}", document
  if operator in ("rename", "retype"):
    parent[key] = _retyped(parent[key], rng)
    return f"retype {list(path)} to {parent[key]!r}", document
  parent[key] = _EDITS[int(rng.integers(0, len(_EDITS)))]
  return f"set {list(path)} = {parent[key]!r}", document


def _json_file_mutation(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
  document = json.loads(data)
  what, mutated = json_mutation(document, rng)
  indent = 2 if b"\n" in data else None
  return what, json.dumps(mutated, indent=indent, sort_keys=indent is not None).encode()


def _header_mutation(data: bytes, region: Region, rng: np.random.Generator) -> tuple[str, bytes]:
  length = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + length])
  if region.kind == "metadata":
    what, mutated = json_mutation(header, rng, within=("__metadata__",))
  else:
    tensors = [k for k in header if k != "__metadata__"]
    name = tensors[int(rng.integers(0, len(tensors)))]
    what, mutated = json_mutation(header, rng, within=(name,)) if rng.random() < 0.8 else json_mutation(header, rng)
  encoded = json.dumps(mutated, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  return f"header JSON: {what}", len(encoded).to_bytes(8, "little") + encoded + data[8 + length:]


# --- manifest ------------------------------------------------------------------------------------------


def _manifest_mutation(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
  lines = data.decode().splitlines(keepends=True)
  i, j = (int(x) for x in rng.choice(len(lines), 2, replace=len(lines) < 2))
  operator = str(rng.choice(["drop", "duplicate", "swap digests", "rename", "upper", "binary marker", "escape",
                             "extra file"]))
  digest_i, name_i = lines[i].rstrip("\n").split("  ", 1)
  if operator == "drop":
    del lines[i]
  elif operator == "duplicate":
    lines.insert(j, lines[i])
  elif operator == "swap digests" and i != j:
    digest_j, name_j = lines[j].rstrip("\n").split("  ", 1)
    lines[i], lines[j] = f"{digest_j}  {name_i}\n", f"{digest_i}  {name_j}\n"
  elif operator == "rename":
    lines[i] = f"{digest_i}  {name_i}.orig\n"
  elif operator == "upper":
    lines[i] = f"{digest_i.upper()}  {name_i}\n"
  elif operator == "binary marker":
    lines[i] = f"{digest_i} *{name_i}\n"
  elif operator == "escape":
    lines[i] = f"{digest_i}  ../{name_i}\n"
  else:
    operator = "extra file"
    lines.append(f"{'0' * 64}  not_there.bin\n")
  return f"manifest: {operator} (line {i + 1})", "".join(lines).encode()


# --- one mutation ---------------------------------------------------------------------------------------


def mutate(directory: pathlib.Path, region: Region, rng: np.random.Generator) -> str:
  """Applies one seeded mutation inside ``region`` of ``directory`` (in place); returns its description."""
  path = directory / region.file
  data = path.read_bytes()
  for _ in range(100):
    structured = rng.random() < 0.5
    if structured and region.kind in ("header", "metadata"):
      what, mutated = _header_mutation(data, region, rng)
    elif structured and region.kind in ("config", "orbax-json"):
      what, mutated = _json_file_mutation(data, rng)
    elif structured and region.kind == "manifest":
      what, mutated = _manifest_mutation(data, rng)
    else:
      what, mutated = _byte_mutation(data, region, rng)
    if mutated != data:
      path.write_bytes(mutated)
      return f"{region.name}: {what}"
  raise AssertionError(f"no mutation of {region.name} changed a byte")
