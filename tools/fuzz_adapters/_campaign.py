"""The campaign: seeded mutations spread over load paths and modes, each outcome classified and checked.

Cells (load path x adapter kind x mode):

* path ``library``: ``jlora.peft.from_pretrained`` (PEFT directories) or ``jlora.load_adapters`` (jlora
  directories, with ``params`` and ``lora``); path ``cli``: ``jlora.cli.main(["validate", DIR, "--base",
  BASE])`` in process (and, separately, a few real ``python -m jlora validate`` subprocesses).
* mode ``manifest``: the directory as jlora writes it, with ``SHA256SUMS``; every byte of every file,
  the manifest included, may be mutated.
* mode ``structure``: the manifest removed (as PEFT writes adapters, or as an attacker would); the
  mutations hit the safetensors length prefix, header and ``__metadata__``, ``adapter_config.json``,
  ``jlora_adapter.json`` and orbax's JSON metadata.
* mode ``payload``: the manifest removed; the mutations hit the bytes that hold tensor values (the
  safetensors data region, orbax's binary files).

Outcomes, and which are allowed:

* ``refused``: ``jlora.UnsafeAdapterError`` (``refused-other``: another ``jlora.JloraError``). Always allowed.
* ``identical``: loaded, every tensor bitwise equal to the unmutated load (same tree, dtypes, shapes,
  bytes) and a config that computes the same thing: the same adapted kernels with the same rank and
  scale, the same dropout and dtype. This is what a flip inside JSON whitespace, an edit of a field
  jlora neither uses nor returns (``peft_version``, ``extra``, orbax timestamps), an upper-cased
  manifest digest or an equivalent regex gives. Always allowed.
* ``reconfigured``: loaded, tensors identical, but the file now declares other hyperparameters (e.g.
  ``lora_alpha`` 8 -> 9) that are consistent with the tensors. Without a manifest nothing can tell
  this from an adapter that was written so; allowed only in mode ``structure`` for an edit of the
  adapter's config file. With a manifest the same edit must be refused.
* ``as-written``: loaded, values differ from the original, and equal what an independent reader
  (``safetensors.numpy`` / plain orbax) decodes from the mutated bytes: jlora read the file exactly.
  Without a manifest a changed value is a valid file; allowed only in mode ``payload``.
* failures: ``base-unchecked`` (loaded although the mutated file no longer carries the base
  fingerprint it was written with: a stripped fingerprint switched the base check off),
  ``foreign-exception`` (anything but a JloraError, or a crash), ``changed`` (values or
  config changed where that is not allowed, or a config that contradicts its tensors), ``misread``
  (loaded values that differ from the independent reader's), ``cli-mismatch`` (the CLI said OK but
  what it loaded is not allowed).
"""

import dataclasses
import pathlib
import shutil
import time

import jax
import numpy as np

import jlora
from jlora import cli
from tools.fuzz_adapters import _mutations, _subjects
from tools.fuzz_adapters._subjects import JLORA, PEFT, Loaded, Subjects

MANIFEST, STRUCTURE, PAYLOAD = "manifest", "structure", "payload"
_MODE_REGIONS = {STRUCTURE: {"length", "header", "metadata", "config", "orbax-json"},
                 PAYLOAD: {"data", "orbax-binary"}}
# (path, kind, mode) -> share of the mutations.
CELLS = {
    ("library", PEFT, MANIFEST): 0.17, ("library", PEFT, STRUCTURE): 0.20, ("library", PEFT, PAYLOAD): 0.07,
    ("library", JLORA, MANIFEST): 0.13, ("library", JLORA, STRUCTURE): 0.12, ("library", JLORA, PAYLOAD): 0.07,
    ("cli", PEFT, MANIFEST): 0.05, ("cli", PEFT, STRUCTURE): 0.07, ("cli", JLORA, MANIFEST): 0.05,
    ("cli", JLORA, STRUCTURE): 0.07,
}
ALLOWED = {"refused", "refused-other", "identical"}
FAILURES = ("base-unchecked", "foreign-exception", "changed", "misread", "cli-mismatch")


@dataclasses.dataclass(frozen=True)
class Result:
  index: int
  path: str
  kind: str
  mode: str
  region: str
  region_kind: str
  mutation: str
  outcome: str
  detail: str
  seconds: float

  @property
  def failed(self) -> bool:
    return not allowed(self)


def allowed(result: Result) -> bool:
  if result.outcome in ALLOWED:
    return True
  if result.outcome == "reconfigured":
    return result.mode == STRUCTURE and result.region_kind == "config"
  if result.outcome == "as-written":
    return result.mode == PAYLOAD
  return False


def plan(mutations: int, seed: int) -> list[tuple[str, str, str]]:
  """The cell of each mutation index: shares as in CELLS (rounded), order shuffled by ``seed``."""
  cells = list(CELLS)
  counts = [int(round(CELLS[c] * mutations)) for c in cells]
  counts[0] += mutations - sum(counts)
  order = [cell for cell, count in zip(cells, counts) for _ in range(count)]
  np.random.default_rng(seed).shuffle(order)
  return order


def _same_tensors(a: dict, b: dict) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _semantics(subjects: Subjects, config: jlora.LoraConfig):
  """What a config computes on the base: {kernel: (rank, scale)}, dropout, dtype; None if it cannot trace."""
  try:
    targets = jlora.Lora(subjects.model, config).trace(subjects.params, _subjects.TOKENS)
  except Exception:  # noqa: BLE001 - a config that cannot be traced computes nothing
    return None
  return {path: (t.rank, t.scale) for path, t in targets.items()}, config.dropout, str(config.dtype)


def _consistent(subjects: Subjects, loaded: Loaded) -> bool:
  """The loaded config, traced on the base, expects exactly the loaded tree's structure and shapes."""
  try:
    lora = jlora.Lora(subjects.model, loaded.config)
    expected = jax.eval_shape(lora.init, jax.random.key(0), subjects.params, _subjects.TOKENS)
  except Exception:  # noqa: BLE001
    return False
  return (jax.tree.structure(expected) == jax.tree.structure(loaded.adapters)
          and all(e.shape == x.shape for e, x in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded.adapters))))


def _compare(subjects: Subjects, kind: str, directory: pathlib.Path, loaded: Loaded) -> tuple[str, str]:
  reference = subjects.reference[kind]
  stored = _subjects.stored_fingerprint(kind, directory)
  if stored != subjects.fingerprint[kind]:
    return "base-unchecked", f"loaded, but the file's stored base fingerprint is now {stored!r}"
  if _same_tensors(loaded.adapters, reference.adapters):
    if loaded.config == reference.config:
      return "identical", ""
    semantics = _semantics(subjects, loaded.config)
    if semantics is not None and semantics == _semantics(subjects, reference.config):
      return "identical", f"equivalent config {loaded.config}"
    if semantics is not None and _consistent(subjects, loaded):
      return "reconfigured", f"config now {loaded.config}"
    return "changed", f"config contradicts its tensors: {loaded.config}"
  independent = _subjects.independent_values(kind, directory, subjects)
  if independent is None:
    return "misread", "loaded, but the independent reader cannot decode the files"
  if not np.array_equal(_subjects.tree_values(loaded.adapters), independent):
    return "misread", "loaded values differ from the independent reader's"
  return "as-written", "values changed as the mutated bytes say"


def classify(subjects: Subjects, path: str, kind: str, directory: pathlib.Path) -> tuple[str, str]:
  """Loads ``directory`` through ``path`` and names the outcome (see the module docstring)."""
  if path == "library":
    try:
      loaded = _subjects.load(subjects, kind, directory)
    except jlora.UnsafeAdapterError as e:
      return "refused", str(e)
    except jlora.JloraError as e:
      return "refused-other", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - the point of the campaign
      return "foreign-exception", f"{type(e).__name__}: {e}"
    return _compare(subjects, kind, directory, loaded)
  try:
    status, err = _subjects.validate_in_process(subjects, directory)
  except BaseException as e:  # noqa: BLE001 - SystemExit included: the CLI must return, not raise
    return "foreign-exception", f"CLI raised {type(e).__name__}: {e}"
  if status == 1 and err.startswith("error: "):
    return "refused", err.strip()
  if status != 0:
    return "foreign-exception", f"CLI exit {status}: {err.strip()}"
  try:  # what the CLI loaded, through the CLI's own loader
    raw = cli._load(str(subjects.base_dir), str(directory), jlora.LoadPolicy())
  except Exception as e:  # noqa: BLE001
    return "cli-mismatch", f"validate said OK, its loader then raised {type(e).__name__}: {e}"
  outcome, detail = _compare(subjects, kind, directory, Loaded(jax.tree.map(np.asarray, raw.adapters), raw.config))
  return outcome, detail


def prepare(subjects: Subjects, kind: str, mode: str, directory: pathlib.Path) -> list[_mutations.Region]:
  """A fresh copy of the pristine ``kind`` directory at ``directory`` and its regions for ``mode``."""
  shutil.copytree(subjects.pristine[kind], directory)
  if mode == MANIFEST:
    return _mutations.regions(directory, kind)
  (directory / _mutations.MANIFEST).unlink()
  return [r for r in _mutations.regions(directory, kind) if r.kind in _MODE_REGIONS[mode]]


def materialize(subjects: Subjects, index: int, cell: tuple[str, str, str], seed: int, scratch: pathlib.Path
                ) -> tuple[pathlib.Path, _mutations.Region, str]:
  """Mutation ``index`` of the campaign with ``seed``, written to a fresh directory (deterministic)."""
  _, kind, mode = cell
  rng = np.random.default_rng([seed, index])
  directory = scratch / f"m{index}"
  regions = prepare(subjects, kind, mode, directory)
  region = regions[int(rng.integers(0, len(regions)))]  # regions, not bytes, uniformly: small ones get hit too
  return directory, region, _mutations.mutate(directory, region, rng)


def run_one(subjects: Subjects, index: int, cell: tuple[str, str, str], seed: int, scratch: pathlib.Path
            ) -> Result:
  path, kind, mode = cell
  directory, region, mutation = materialize(subjects, index, cell, seed, scratch)
  start = time.perf_counter()
  outcome, detail = classify(subjects, path, kind, directory)
  seconds = time.perf_counter() - start
  shutil.rmtree(directory)
  return Result(index, path, kind, mode, region.name, region.kind, mutation, outcome, detail[:300], seconds)


def metadata_span_flips(subjects: Subjects, scratch: pathlib.Path, within: bytes | None = None) -> list[Result]:
  """Every bit of the safetensors ``__metadata__`` span of the PEFT file flipped, one at a time, no manifest.

  The span is where the base fingerprint lives; a flip there must never let the adapter load without
  its base check. ``within``: only the bytes of this substring of the span (e.g. the fingerprint's key).
  """
  directory = scratch / "span"
  regions = prepare(subjects, PEFT, STRUCTURE, directory)
  (span,) = [r for r in regions if r.kind == "metadata"]
  weights = directory / _mutations.WEIGHTS
  original = weights.read_bytes()
  begin, end = span.begin, span.end
  if within is not None:
    begin = original.index(within, span.begin, span.end)
    end = begin + len(within)
  results = []
  for position in range(begin, end):
    for bit in range(8):
      mutated = bytearray(original)
      mutated[position] ^= 1 << bit
      weights.write_bytes(bytes(mutated))
      start = time.perf_counter()
      outcome, detail = classify(subjects, "library", PEFT, directory)
      results.append(Result(len(results), "library", PEFT, STRUCTURE, span.name, span.kind,
                            f"flip bit {bit} of byte {position}", outcome, detail[:300],
                            time.perf_counter() - start))
  shutil.rmtree(directory)
  return results


def summary(results: list[Result]) -> dict[str, dict[str, int]]:
  """``{"path/kind/mode": {outcome: count}}`` plus a ``total`` row."""
  table: dict[str, dict[str, int]] = {}
  for result in results:
    for row in (f"{result.path}/{result.kind}/{result.mode}", "total"):
      table.setdefault(row, {})
      table[row][result.outcome] = table[row].get(result.outcome, 0) + 1
  return table
