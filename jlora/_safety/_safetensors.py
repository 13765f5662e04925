"""A strict safetensors reader in pure Python + numpy: every byte of the header is checked before use.

The safetensors layout is ``u64 little-endian header length N | N bytes of JSON | data``. The reader
checks the file size against the cap, reads the 8-byte length and refuses a huge declared size before
reading (or allocating) the header, then validates every entry (allowed dtype, integer shape,
offsets that tile the data region exactly with no gap, overlap or trailing byte) and the expected
key set and shapes before it reads a single tensor. Values must be finite. When a SHA-256 digest is
given, it is computed over exactly the bytes that were parsed.
"""

import dataclasses
import hashlib
import math
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jlora._safety._errors import UnsafeAdapterError
from jlora._safety._files import checked_size, parse_json, pickle_kind
from jlora._safety._policy import LoadPolicy

# The only dtypes an adapter may hold. Integers, bools, float64 and float8 are refused.
ALLOWED_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4")}
_KNOWN_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F64", "F8_E4M3", "F8_E5M2",
                 "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", *ALLOWED_DTYPES}
_MAX_NDIM = 8
_LISTED = 8


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors header: dtype name (``F32``...), shape, and byte range in the data."""

  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsFile:
  """A validated safetensors file: its entries, its ``__metadata__`` and (when read) its tensors."""

  path: pathlib.Path
  entries: dict[str, TensorEntry]
  metadata: dict[str, str]
  tensors: dict[str, np.ndarray]


def _listing(items: list[str]) -> str:
  more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
  return ", ".join(items[:_LISTED]) + more


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: pathlib.Path, name: str, raw) -> TensorEntry:
  where = f"{path}: tensor {name!r}"
  if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
    raise UnsafeAdapterError(f"{where} must have exactly 'dtype', 'shape' and 'data_offsets', got "
                             f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}.")
  dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
  if not isinstance(dtype, str):
    raise UnsafeAdapterError(f"{where} has dtype {dtype!r}, which is not a safetensors dtype name.")
  if dtype not in ALLOWED_DTYPES:
    kind = "is not allowed in an adapter" if dtype in _KNOWN_DTYPES else "is not a safetensors dtype"
    raise UnsafeAdapterError(f"{where} has dtype {dtype!r}, which {kind} (allowed: F16, BF16, F32).")
  if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
    raise UnsafeAdapterError(f"{where} has an invalid shape {shape!r} (a list of at most {_MAX_NDIM} "
                             "non-negative ints).")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
          and 0 <= offsets[0] <= offsets[1]):
    raise UnsafeAdapterError(f"{where} has invalid data_offsets {offsets!r}.")
  nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype].itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise UnsafeAdapterError(f"{where}: shape {shape} of {dtype} needs {nbytes:,} bytes but data_offsets "
                             f"{offsets} span {offsets[1] - offsets[0]:,}.")
  return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _parse_header(path: pathlib.Path, header: bytes, data_len: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
  raw = parse_json(header, f"The safetensors header of {path}")
  if not isinstance(raw, dict):
    raise UnsafeAdapterError(f"The safetensors header of {path} is not a JSON object.")
  metadata = raw.pop("__metadata__", {})
  if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise UnsafeAdapterError(f"{path}: __metadata__ must map strings to strings.")
  entries = {name: _entry(path, name, value) for name, value in raw.items()}
  position = 0
  for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
    if entry.begin != position:
      what = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
      raise UnsafeAdapterError(f"{path}: tensor {name!r} starts at byte {entry.begin:,} and {what} (expected "
                               f"{position:,}); a safetensors data region is tiled exactly.")
    position = entry.end
  if position != data_len:
    raise UnsafeAdapterError(f"{path}: the tensors cover {position:,} bytes but the data region holds "
                             f"{data_len:,} (truncated, padded or tampered file).")
  return entries, metadata


def _check_expected(path: pathlib.Path, entries: Mapping[str, TensorEntry], expected: Mapping[str, tuple],
                    optional: Mapping[str, tuple]) -> None:
  missing = sorted(set(expected) - set(entries))
  unexpected = sorted(set(entries) - set(expected) - set(optional))
  wrong = [f"{name!r} is {entries[name].shape}, expected {tuple(shape)}"
           for name, shape in [*expected.items(), *optional.items()]
           if name in entries and entries[name].shape != tuple(shape)]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
  if wrong:
    problems.append(f"tensors with the wrong shape ({len(wrong)}): {_listing(wrong)}")
  if problems:
    raise UnsafeAdapterError(f"{path} does not hold the tensors its config and base model imply: "
                             + "; ".join(problems) + ".")


def _read_header(f, path: pathlib.Path, prefix: bytes, size: int, policy: LoadPolicy
                 ) -> tuple[bytes, dict[str, TensorEntry], dict[str, str]]:
  if len(prefix) < 8:
    raise UnsafeAdapterError(f"{path} is {size} bytes: too short for a safetensors header (truncated file).")
  header_len = int.from_bytes(prefix, "little")
  if header_len > policy.max_header_bytes:
    raise UnsafeAdapterError(f"{path} declares a {header_len:,}-byte header, over the "
                             f"{policy.max_header_bytes:,}-byte cap (LoadPolicy.max_header_bytes).")
  if 8 + header_len > size:
    raise UnsafeAdapterError(f"{path} declares a {header_len:,}-byte header but holds only {size - 8:,} bytes "
                             "after the length field (truncated or corrupted file).")
  header = f.read(header_len)
  if len(header) != header_len:
    raise UnsafeAdapterError(f"{path} changed while it was read.")
  entries, metadata = _parse_header(path, header, size - 8 - header_len)
  return header, entries, metadata


def read_safetensors(path: str | pathlib.Path, policy: LoadPolicy, *, expected: Mapping[str, tuple] | None = None,
                     optional: Mapping[str, tuple] | None = None, sha256: str | None = None,
                     read_data: bool = True) -> SafetensorsFile:
  """Reads a safetensors file, refusing anything malformed, oversized, non-float or non-finite.

  Args:
    path: the ``.safetensors`` file.
    policy: size caps.
    expected: ``{name: shape}`` the file must hold exactly (None: any names).
    optional: ``{name: shape}`` the file may also hold.
    sha256: hex digest the file's bytes must have (from a manifest).
    read_data: False reads and validates the header only (``tensors`` is empty, no digest check).

  Raises:
    UnsafeAdapterError: naming the file and, where there is one, the tensor.
  """
  path = pathlib.Path(path)
  size = checked_size(path, policy.max_file_bytes, "Adapter weights file")
  if path.suffix != ".safetensors":
    raise UnsafeAdapterError(f"{path} is not a .safetensors file; jlora reads adapter weights only as safetensors.")
  with open(path, "rb") as f:
    prefix = f.read(8)
    try:
      header, entries, metadata = _read_header(f, path, prefix, size, policy)
    except UnsafeAdapterError:
      kind = pickle_kind(prefix)  # a pickle's first bytes read as an absurd header length or a binary header
      if kind is not None:
        raise UnsafeAdapterError(f"{path} is {kind}, not safetensors; jlora never unpickles.") from None
      raise
    data_len = size - 8 - len(header)
    if expected is not None:
      _check_expected(path, entries, expected, optional or {})
    if not read_data:
      return SafetensorsFile(path, entries, metadata, {})
    data = f.read(data_len + 1)
  if len(data) != data_len:
    raise UnsafeAdapterError(f"{path} changed while it was read.")
  if sha256 is not None:
    digest = hashlib.sha256()
    for chunk in (prefix, header, data):
      digest.update(chunk)
    if digest.hexdigest() != sha256.lower():
      raise UnsafeAdapterError(f"{path} does not match its SHA-256 in the manifest (file {digest.hexdigest()}, "
                               f"manifest {sha256}): the file was modified after it was written.")
  tensors = {}
  for name, entry in entries.items():
    count, dtype = math.prod(entry.shape), ALLOWED_DTYPES[entry.dtype]
    array = np.frombuffer(data, dtype, count, entry.begin).reshape(entry.shape) if count else np.zeros(entry.shape, dtype)
    bad = ~np.isfinite(array.astype(np.float32))
    if bad.any():
      raise UnsafeAdapterError(f"{path}: tensor {name!r} holds {int(bad.sum())} non-finite value(s) (NaN/inf) "
                               f"out of {array.size}.")
    tensors[name] = array
  return SafetensorsFile(path, entries, metadata, tensors)
