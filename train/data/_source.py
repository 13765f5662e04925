"""One reading path for every dataset: a random-access TFDS data source of one split (array_record)."""

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from train.data._errors import NO_EXAMPLES, DataError


def data_source(
    dataset: str | tfds.core.DatasetBuilder,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Sequence[dict[str, Any]]:
  """Opens one split of a TFDS dataset stored as array_record, for random access (``len``, ``[i]``).

  ``dataset`` is a builder (e.g. from ``build_jsonl_instructions``), or any name ``tfds.data_source``
  takes: a registered dataset (``"my_dataset"``, ``"my_dataset/config:1.0.0"``) or one of ours by its
  config (``"jlora_jsonl_instructions/my_sft"``), read from ``data_dir``. Both are the same
  ``ArrayRecordDataSource``; text comes back as ``bytes``. TFDS split slicing (``"train[:90%]"``) works.

  Args:
    dataset: a prepared builder, or a dataset name.
    split: the split, e.g. ``"train"`` or ``"train[90%:]"``.
    data_dir: where the dataset is stored (names only; a builder knows its own).
    download: for names, let TFDS prepare a dataset that is not in ``data_dir`` yet (this may download).

  Returns:
    The data source: ``source[i]`` is a dict of numpy values / bytes; ``source.dataset_info`` describes it.

  Raises:
    DataError: the split has no example (reason ``no_examples``), or the builder is not prepared.

  Example:
    >>> import pathlib, tempfile
    >>> from train.data import build_text
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "a.txt").write_text("one\\ntwo\\n")
    >>> builder = build_text({"train": tmp / "a.txt"}, tmp / "tfds", name="lines")
    >>> source = data_source("jlora_text/lines", "train", data_dir=tmp / "tfds")
    >>> len(source), source[1]["text"]
    (2, b'two')
  """
  if isinstance(dataset, tfds.core.DatasetBuilder):
    if not dataset.is_prepared():
      raise DataError(f"dataset {dataset.name} is not prepared in {dataset.data_dir}; call "
                      "builder.download_and_prepare(file_format='array_record') first.", reason=NO_EXAMPLES)
    source = dataset.as_data_source(split=split)
  else:
    source = tfds.data_source(
        dataset, split=split, data_dir=os.fspath(data_dir) if data_dir is not None else None, download=download
    )
  if len(source) == 0:
    raise DataError(f"split {split!r} of {source.dataset_info.full_name} has no example.", reason=NO_EXAMPLES)
  return source
