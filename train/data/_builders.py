"""TFDS datasets built from local files, stored as array_record for random access with ``tfds.data_source``.

Building is two passes over the files. The first checks every unit (JSON line, text paragraph, ...),
applies ``on_bad_example`` (raise a ``DataError`` naming file, line and reason, or skip and count) and
decides which example goes to which split, so bad input surfaces here, before anything is written or
trained. The second writes the good examples, in file order, through a TFDS ``GeneratorBasedBuilder``.

Naming and the TFDS registry: the three builder classes (``jlora_jsonl_instructions``,
``jlora_jsonl_classification``, ``jlora_text``) are deliberately *not* added to TFDS's global registry, so
importing this module twice, or building many datasets in one process, never clashes. Each dataset is
a builder config named by the caller and lives in ``data_dir/<builder>/<name>/1.0.0/``; it reads back by
name through TFDS's read-from-files path: ``tfds.data_source("jlora_text/my_corpus", split="train",
data_dir=data_dir)``. Distinct datasets need distinct names (or ``data_dir``s): a dataset that exists with
the same name but other inputs or options is an error unless ``overwrite=True``. Identical inputs
(same file contents and options, tracked by a fingerprint) reuse what is on disk.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from train.data._errors import EXISTS, NO_EXAMPLES, BadExample, BadExamplePolicy, DataError, format_skips
from train.data._kinds import ClassificationKind, InstructionsKind, TextKind
from train.data._units import Unit, read_units

PathsBySplit = Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]
# split -> [(path, sorted line numbers of the examples of this split in that file)]
_Plan = dict[str, list[tuple[str, np.ndarray]]]

_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class _LocalFilesConfig(tfds.core.BuilderConfig):
  kind: Any = None
  plan: Any = None
  skipped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split -> reason -> count
  fingerprint: str = ""


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the examples that a scan of local files planned (``_LocalFilesConfig.plan``)."""

  VERSION = tfds.core.Version(_VERSION)
  builder_config: _LocalFilesConfig

  # TFDS looks for a download-checksums file next to the builder's code, and finding the code of a
  # class inside a package needs the `importlib_resources` backport. Local files have no checksums.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=config.description,
        features=config.kind.features(),
        disable_shuffling=True,  # file order: example i of a split is the i-th good unit
        metadata=tfds.core.MetadataDict(
            fingerprint=config.fingerprint, skipped=config.skipped, kind=type(config.kind).__name__
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {split: self._generate_examples(files) for split, files in self.builder_config.plan.items()}

  def _generate_examples(self, files):
    kind = self.builder_config.kind
    for file_index, (path, lines) in enumerate(files):
      wanted = set(lines.tolist())
      for line, unit in read_units(path, kind.unit):
        if line not in wanted:
          continue
        value = unit if isinstance(unit, BadExample) else kind.check(unit)
        if isinstance(value, BadExample):
          raise DataError(f"changed while the dataset was built ({value.detail})", reason=value.reason,
                          where=f"{path}:{line}")
        yield f"{file_index}:{line}", {**kind.example(value), "file": path, "line": line}


class _JloraJsonlInstructions(_LocalFilesBuilder, skip_registration=True):
  name = "jlora_jsonl_instructions"


class _JloraJsonlClassification(_LocalFilesBuilder, skip_registration=True):
  name = "jlora_jsonl_classification"


class _JloraText(_LocalFilesBuilder, skip_registration=True):
  name = "jlora_text"


def _normalize(paths_by_split: PathsBySplit) -> dict[str, tuple[str, ...]]:
  if not paths_by_split:
    raise ValueError("paths_by_split is empty: give at least {'train': path}.")
  files = {}
  for split, paths in paths_by_split.items():
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
      raise ValueError(f"Split name {split!r} must match [A-Za-z0-9_-]+.")
    paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
    if not paths:
      raise ValueError(f"Split {split!r} has no files.")
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"Split {split!r}: no such file {os.fspath(path)!r}.")
    files[split] = tuple(os.fspath(p) for p in paths)
  return files


def _fingerprint(builder_name: str, options: dict[str, Any], files: dict[str, tuple[str, ...]]) -> str:
  """sha256 over the builder, the options and the contents (not the names) of the files of every split."""
  digest = hashlib.sha256(json.dumps([builder_name, _VERSION, options], sort_keys=True, default=str).encode())
  for split in sorted(files):
    digest.update(split.encode())
    for path in files[split]:
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      digest.update(b"\0end-of-file\0")
  return digest.hexdigest()


def _scan(kind, files: dict[str, tuple[str, ...]], policies: dict[str, BadExamplePolicy]) -> _Plan:
  plan = {}
  for split, paths in files.items():
    plan[split] = []
    for path in paths:
      lines = []
      for line, unit in read_units(path, kind.unit):
        value = unit if isinstance(unit, BadExample) else kind.check(unit)
        if isinstance(value, BadExample):
          policies[split].handle(value, f"{path}:{line}")
        else:
          lines.append(line)
      plan[split].append((path, np.asarray(lines, dtype=np.int64)))
  kind.finish_scan()
  return plan


def _hold_out(plan: _Plan, source: str, target: str, fraction: float, seed: int) -> _Plan:
  """Moves ``round(fraction * n)`` of the ``n`` examples of ``source`` to ``target``, chosen by ``seed``."""
  n = sum(len(lines) for _, lines in plan[source])
  k = round(fraction * n)
  if not 1 <= k <= n - 1:
    raise DataError(
        f"holdout_fraction={fraction} of {n} good examples of split {source!r} leaves an empty split "
        f"({k} held out); use a fraction between {1 / max(n, 1):.3g} and {(n - 1) / max(n, 1):.3g}.",
        reason=NO_EXAMPLES,
    )
  held = np.zeros(n, dtype=bool)
  held[np.random.default_rng(seed).permutation(n)[:k]] = True
  kept_plan, held_plan, start = [], [], 0
  for path, lines in plan[source]:
    mask = held[start:start + len(lines)]
    start += len(lines)
    kept_plan.append((path, lines[~mask]))
    held_plan.append((path, lines[mask]))
  return {**plan, source: kept_plan, target: held_plan}


def _log_skips(builder_name: str, name: str, skipped: Mapping[str, Mapping[str, int]]) -> None:
  if skipped:
    logging.warning("%s/%s: bad examples skipped while building (on_bad_example='skip'): %s.", builder_name, name,
                    "; ".join(f"{split}: {format_skips(dict(counts))}" for split, counts in skipped.items()))


def _build(
    builder_cls: type[_LocalFilesBuilder],
    kind,
    paths_by_split: PathsBySplit,
    data_dir: str | os.PathLike,
    *,
    name: str,
    holdout_fraction: float,
    holdout_split: str,
    holdout_from: str,
    holdout_seed: int,
    on_bad_example: str,
    overwrite: bool,
) -> tfds.core.DatasetBuilder:
  if not re.fullmatch(r"[\w.+-]+", name):
    raise ValueError(f"Dataset name {name!r} must match [A-Za-z0-9_.+-]+ (it is a TFDS config name).")
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
  files = _normalize(paths_by_split)
  if holdout_fraction and holdout_from not in files:
    raise ValueError(f"holdout_from={holdout_from!r} is not one of the splits {sorted(files)}.")
  if holdout_fraction and holdout_split in files:
    raise ValueError(f"holdout_split={holdout_split!r} already has files; pick another name or drop its files.")
  policies = {split: BadExamplePolicy(on_bad_example, f"{builder_cls.name}/{name}", warn_first=False)
              for split in files}
  options = {
      "kind": {field: value for field, value in dataclasses.asdict(kind).items() if not field.startswith("_")},
      "holdout": [holdout_fraction, holdout_split, holdout_from, holdout_seed] if holdout_fraction else None,
      "on_bad_example": on_bad_example,
  }
  fingerprint = _fingerprint(builder_cls.name, options, files)
  variant_dir = os.path.join(os.fspath(data_dir), builder_cls.name, name, _VERSION)
  if os.path.exists(os.path.join(variant_dir, "dataset_info.json")) and not overwrite:
    existing = tfds.builder_from_directory(variant_dir)
    if existing.info.metadata.get("fingerprint") != fingerprint:
      raise DataError(
          f"{builder_cls.name}/{name} already exists in {os.fspath(data_dir)} and was built from other files or "
          "options; pass overwrite=True to rebuild it, or use another name.",
          reason=EXISTS,
          where=variant_dir,
      )
    logging.info("Reusing %s/%s from %s (same files and options).", builder_cls.name, name, variant_dir)
    _log_skips(builder_cls.name, name, existing.info.metadata.get("skipped") or {})
    return existing

  plan = _scan(kind, files, policies)
  skipped = {split: policy.counts for split, policy in policies.items() if policy.counts}
  if holdout_fraction:
    plan = _hold_out(plan, holdout_from, holdout_split, holdout_fraction, holdout_seed)
  for split, split_files in plan.items():
    if not sum(len(lines) for _, lines in split_files):
      raise DataError(
          f"split {split!r} has no usable example ({format_skips(skipped.get(split, {}))}) in "
          f"{[p for p, _ in split_files]}.",
          reason=NO_EXAMPLES,
      )
  _log_skips(builder_cls.name, name, skipped)
  config = _LocalFilesConfig(
      name=name,
      version=_VERSION,
      description=f"{builder_cls.name} from {json.dumps(files)}",
      kind=kind,
      plan=plan,
      skipped=skipped,
      fingerprint=fingerprint,
  )
  builder = builder_cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  mode = tfds.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.GenerateMode.REUSE_DATASET_IF_EXISTS
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout; keep stdout for the job
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


_HOLDOUT_ARGS_DOC = """
    holdout_fraction: if > 0, move this fraction of the good examples of ``holdout_from`` (rounded to a
      whole number, at least one and not all) to a new split ``holdout_split``; which ones is a
      permutation drawn from ``holdout_seed``, so the same files give the same split.
    holdout_split: the name of the held-out split.
    holdout_from: the split that gives up the held-out examples.
    holdout_seed: the seed of the held-out choice.
    on_bad_example: ``"raise"``: the first bad unit raises a ``DataError`` naming file, line and reason;
      ``"skip"``: bad units are left out, counted by reason, logged once, and stored in the dataset's
      metadata (``info.metadata["skipped"][split]``; bad lines of a split that gives a held-out part count
      for that split). Empty files and empty splits always raise.
    overwrite: rebuild even if a dataset of this name exists (needed when its files or options changed)."""


def _doc(function):
  function.__doc__ = function.__doc__.replace("    {holdout_args}", _HOLDOUT_ARGS_DOC.strip("\n"))
  return function


@_doc
def build_jsonl_instructions(
    paths_by_split: PathsBySplit,
    data_dir: str | os.PathLike,
    *,
    name: str,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    holdout_fraction: float = 0.0,
    holdout_split: str = "validation",
    holdout_from: str = "train",
    holdout_seed: int = 0,
    on_bad_example: str = "raise",
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) a TFDS dataset ``jlora_jsonl_instructions/<name>`` from JSONL instruction files.

  Each non-blank line is ``{"prompt": str, "completion": str}`` or chat-style ``{"messages": [{"role":
  "system"|"user"|"assistant", "content": str}, ...]}``; both forms may mix. An example is stored as
  its turns ``{"role": [...], "content": [...]}`` (prompt/completion as roles ``"prompt"`` and
  ``"completion"``) plus ``file`` and ``line``.

  Args:
    paths_by_split: ``{"train": "train.jsonl", "validation": ["a.jsonl", "b.jsonl"]}``.
    data_dir: where TFDS stores the dataset.
    name: the dataset's name (a TFDS config name).
    prompt_field: the prompt's field name.
    completion_field: the completion's field name.
    messages_field: the field name of the chat message list.
    {holdout_args}

  Returns:
    The prepared builder: ``data_source(builder, "train")`` reads it.

  Raises:
    DataError: a bad line (``on_bad_example="raise"``), an empty file or split, or a name clash.

  Example:
    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "sft.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\\n' * 10)
    >>> builder = build_jsonl_instructions({"train": tmp / "sft.jsonl"}, tmp / "tfds", name="sft",
    ...                                    holdout_fraction=0.2)
    >>> {split: info.num_examples for split, info in sorted(builder.info.splits.items())}
    {'train': 8, 'validation': 2}
  """
  kind = InstructionsKind(prompt_field=prompt_field, completion_field=completion_field, messages_field=messages_field)
  return _build(_JloraJsonlInstructions, kind, paths_by_split, data_dir, name=name, holdout_fraction=holdout_fraction,
                holdout_split=holdout_split, holdout_from=holdout_from, holdout_seed=holdout_seed,
                on_bad_example=on_bad_example, overwrite=overwrite)


@_doc
def build_jsonl_classification(
    paths_by_split: PathsBySplit,
    data_dir: str | os.PathLike,
    *,
    name: str,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    holdout_fraction: float = 0.0,
    holdout_split: str = "validation",
    holdout_from: str = "train",
    holdout_seed: int = 0,
    on_bad_example: str = "raise",
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) a TFDS dataset ``jlora_jsonl_classification/<name>`` from JSONL ``{"text", "label"}`` files.

  Labels are all integers (``>= 0``) or all strings. They become a ``tfds.features.ClassLabel``
  (``builder.info.features["label"].names``): given ``label_names``, or else collected over all splits
  (integers: classes ``0..max``; strings: their sorted set).

  Args:
    paths_by_split: ``{"train": "train.jsonl", "test": "test.jsonl"}``.
    data_dir: where TFDS stores the dataset.
    name: the dataset's name (a TFDS config name).
    text_field: the text's field name.
    label_field: the label's field name.
    label_names: the class names, in class-index order; None collects them from the files.
    {holdout_args}

  Returns:
    The prepared builder.

  Raises:
    DataError: a bad line (``on_bad_example="raise"``), an empty file or split, or a name clash.

  Example:
    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "cls.jsonl").write_text('{"text": "good", "label": "pos"}\\n{"text": "bad", "label": "neg"}\\n')
    >>> builder = build_jsonl_classification({"train": tmp / "cls.jsonl"}, tmp / "tfds", name="cls")
    >>> builder.info.features["label"].names
    ['neg', 'pos']
    >>> data_source = builder.as_data_source("train")
    >>> data_source[0]["label"], data_source[0]["line"]
    (1, 1)
  """
  kind = ClassificationKind(text_field=text_field, label_field=label_field,
                            label_names=tuple(label_names) if label_names is not None else None)
  return _build(_JloraJsonlClassification, kind, paths_by_split, data_dir, name=name,
                holdout_fraction=holdout_fraction, holdout_split=holdout_split, holdout_from=holdout_from,
                holdout_seed=holdout_seed, on_bad_example=on_bad_example, overwrite=overwrite)


@_doc
def build_text(
    paths_by_split: PathsBySplit,
    data_dir: str | os.PathLike,
    *,
    name: str,
    unit: Unit = "line",
    holdout_fraction: float = 0.0,
    holdout_split: str = "validation",
    holdout_from: str = "train",
    holdout_seed: int = 0,
    on_bad_example: str = "raise",
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) a TFDS dataset ``jlora_text/<name>`` of plain text, stored as ``{"text", "file", "line"}``.

  Args:
    paths_by_split: ``{"train": ["a.txt", "b.txt"]}``.
    data_dir: where TFDS stores the dataset.
    name: the dataset's name (a TFDS config name).
    unit: one example per ``"line"`` (non-blank), ``"paragraph"`` (blocks between blank lines) or
      ``"document"`` (the whole file); see ``read_units``. Only bytes that are not UTF-8 make a unit bad.
    {holdout_args}

  Returns:
    The prepared builder.

  Raises:
    DataError: a unit that is not UTF-8 (``on_bad_example="raise"``), an empty file or split, a name clash.

  Example:
    >>> import pathlib, tempfile
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "a.txt").write_text("first para\\nstill first\\n\\nsecond\\n")
    >>> builder = build_text({"train": tmp / "a.txt"}, tmp / "tfds", name="corpus", unit="paragraph")
    >>> [example["text"] for example in builder.as_data_source("train")]
    [b'first para\\nstill first', b'second']
  """
  return _build(_JloraText, TextKind(unit=unit), paths_by_split, data_dir, name=name,
                holdout_fraction=holdout_fraction, holdout_split=holdout_split, holdout_from=holdout_from,
                holdout_seed=holdout_seed, on_bad_example=on_bad_example, overwrite=overwrite)
