"""SHA-256 manifests: a ``SHA256SUMS`` file beside the adapter, in ``sha256sum`` format.

``sha256sum -c SHA256SUMS`` verifies a directory with standard tools; jlora verifies it on every load
when it is present (or required), and refuses any listed file that is missing or differs.
"""

import hashlib
import os
import pathlib
import re

from jlora._safety._errors import UnsafeAdapterError
from jlora._safety._files import read_bytes
from jlora._safety._policy import LoadPolicy

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files_under(directory: pathlib.Path) -> list[str]:
  return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: str | os.PathLike) -> pathlib.Path:
  """Writes ``directory/SHA256SUMS`` listing the SHA-256 of every file under ``directory``.

  The format is ``sha256sum``'s (``<hex>  <relative path>``), so ``sha256sum -c SHA256SUMS`` checks it
  too. jlora's writers (``save_adapters``, ``jlora.peft.save_pretrained``/``save_merged``) call this.

  Returns:
    The manifest's path.

  Example:
    >>> import pathlib, tempfile, jlora
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("hi")
    >>> print(jlora.write_manifest(d).read_text(), end="")
    8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4  a.txt
    >>> sorted(jlora.verify_manifest(d))
    ['a.txt']
  """
  directory = pathlib.Path(directory)
  lines = [f"{file_sha256(directory / name)}  {name}\n" for name in _files_under(directory)]
  target = directory / MANIFEST
  partial = directory / (MANIFEST + ".partial")
  partial.write_text("".join(lines))
  os.replace(partial, target)
  return target


def read_manifest(directory: str | os.PathLike, policy: LoadPolicy | None = None) -> dict[str, str] | None:
  """``{relative path: hex digest}`` from ``directory/SHA256SUMS``, or None when there is none."""
  policy = policy or LoadPolicy()
  directory = pathlib.Path(directory)
  path = directory / MANIFEST
  if not path.exists():
    return None
  text = read_bytes(path, policy.max_json_bytes, "Manifest")
  try:
    lines = text.decode("utf-8").splitlines()
  except UnicodeDecodeError:
    raise UnsafeAdapterError(f"Manifest {path} is not UTF-8 text.") from None
  digests: dict[str, str] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    match = _LINE.fullmatch(line)
    name = match.group(2) if match else ""
    parts = pathlib.PurePosixPath(name).parts
    if not match or name.startswith("/") or ".." in parts or "\\" in name:
      raise UnsafeAdapterError(f"Manifest {path}, line {number}: expected '<sha256 hex>  <relative path>' "
                               f"inside the directory, got {line[:120]!r}.")
    if name in digests:
      raise UnsafeAdapterError(f"Manifest {path} lists {name!r} twice.")
    digests[name] = match.group(1).lower()
  if not digests:
    raise UnsafeAdapterError(f"Manifest {path} lists no files.")
  return digests


def verify_manifest(directory: str | os.PathLike, *, required: bool = False, covering: tuple[str, ...] = (),
                    policy: LoadPolicy | None = None) -> dict[str, str]:
  """Checks every file listed in ``directory/SHA256SUMS`` against its SHA-256.

  Args:
    directory: the adapter directory.
    required: refuse a directory without a manifest.
    covering: relative paths the caller will read; each must be listed (when a manifest exists).
    policy: size caps for the manifest itself.

  Returns:
    ``{relative path: digest}`` of the verified files (empty when there is no manifest).

  Raises:
    UnsafeAdapterError: no manifest although required, a malformed manifest, a listed file missing or
      with another digest, or a file in ``covering`` that the manifest does not list.
  """
  directory = pathlib.Path(directory)
  policy = policy or LoadPolicy()
  digests = read_manifest(directory, policy)
  if digests is None:
    if required or policy.require_manifest:
      raise UnsafeAdapterError(f"{directory} has no {MANIFEST} manifest, and one is required "
                               "(LoadPolicy.require_manifest / --require-manifest).")
    return {}
  uncovered = [name for name in covering if name not in digests]
  if uncovered:
    raise UnsafeAdapterError(f"{directory}/{MANIFEST} does not cover {uncovered[:8]}, which would be read unverified.")
  for name, expected in digests.items():
    path = directory / name
    if not path.is_file():
      raise UnsafeAdapterError(f"{path} is listed in {MANIFEST} but missing (or not a regular file).")
    if path.stat().st_size > policy.max_file_bytes:
      raise UnsafeAdapterError(f"{path} is over the {policy.max_file_bytes:,}-byte cap (LoadPolicy.max_file_bytes).")
    actual = file_sha256(path)
    if actual != expected:
      raise UnsafeAdapterError(f"{path} does not match its SHA-256 in {MANIFEST} (file {actual}, manifest "
                               f"{expected}): the file was modified after it was written.")
  return digests
