"""Fixed-length rows: packed next-token LM examples, and padded classification examples.

An LM example of ``n`` tokens ``t`` with training flags ``w`` takes ``n - 1`` positions of a row:
``inputs = t[:-1]``, ``targets = t[1:]``, ``loss_mask = w[1:]`` (the flag of the token being predicted),
``positions = 0 .. n-2``, and its own ``segment_ids`` value ``s = 1, 2, ...`` in the row. The shift is
within each example, so no example predicts the first token of the next. Padding has segment 0, loss
mask 0 and token 0. Attention is block-diagonal when it only lets equal, non-zero segment ids meet.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from train.data._errors import OVER_LONG, DataError

LM_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
CLASSIFICATION_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "label", "example_mask")


class LMExample(NamedTuple):
  """One tokenized LM example.

  Attributes:
    ids: ``[n]`` int32 token ids.
    trained: ``[n]`` bool, True where the token is a training target (completion / assistant / text).
  """

  ids: np.ndarray
  trained: np.ndarray

  @property
  def num_positions(self) -> int:
    """The row positions the example takes: ``n - 1`` (inputs and targets are shifted by one)."""
    return len(self.ids) - 1


class ClassificationExample(NamedTuple):
  """One tokenized classification example: ``ids`` (with the tokenizer's special tokens) and its ``label``."""

  ids: np.ndarray
  type_ids: np.ndarray
  label: int


def lm_rows(groups: Sequence[Sequence[LMExample]], seq_len: int) -> dict[str, np.ndarray]:
  """Lays out each group of examples as one packed row (see the module docstring).

  Args:
    groups: the examples of each row, in order; an empty group is an all-padding row.
    seq_len: the row length; the positions of a group must add up to at most ``seq_len``.

  Returns:
    ``{"inputs", "targets", "loss_mask", "segment_ids", "positions"}``, each ``[len(groups), seq_len]`` int32.
  """
  rows = {field: np.zeros((len(groups), seq_len), np.int32) for field in LM_FIELDS}
  for r, group in enumerate(groups):
    offset = 0
    for segment, example in enumerate(group, start=1):
      n = example.num_positions
      if offset + n > seq_len:
        raise ValueError(f"Row {r} needs {offset + n} positions, more than seq_len={seq_len}.")
      span = slice(offset, offset + n)
      rows["inputs"][r, span] = example.ids[:-1]
      rows["targets"][r, span] = example.ids[1:]
      rows["loss_mask"][r, span] = example.trained[1:]
      rows["segment_ids"][r, span] = segment
      rows["positions"][r, span] = np.arange(n)
      offset += n
  return rows


def pack_lm_examples(examples: Sequence[LMExample], seq_len: int) -> dict[str, np.ndarray]:
  """Packs examples, in order, into as few rows as sequential greedy packing gives.

  Each example goes into the current row if it fits, else starts a new row; examples are never split
  or reordered (so the packing of a stream depends only on where the stream starts).

  Args:
    examples: tokenized examples.
    seq_len: the row length.

  Returns:
    ``{"inputs", "targets", "loss_mask", "segment_ids", "positions"}``, each ``[rows, seq_len]`` int32.

  Raises:
    DataError: an example needs more than ``seq_len`` positions (reason ``over_long``).

  Example:
    >>> a = LMExample(np.array([5, 6, 7]), np.array([False, False, True]))
    >>> b = LMExample(np.array([8, 9]), np.array([False, True]))
    >>> rows = pack_lm_examples([a, b], seq_len=4)
    >>> rows["inputs"].tolist(), rows["targets"].tolist(), rows["loss_mask"].tolist()
    ([[5, 6, 8, 0]], [[6, 7, 9, 0]], [[0, 1, 1, 0]])
    >>> rows["segment_ids"].tolist(), rows["positions"].tolist()
    ([[1, 1, 2, 0]], [[0, 1, 0, 0]])
  """
  groups: list[list[LMExample]] = []
  used = seq_len  # forces a new row for the first example
  for i, example in enumerate(examples):
    n = example.num_positions
    if n > seq_len:
      raise DataError(f"example {i} needs {n} positions, more than seq_len={seq_len}.", reason=OVER_LONG)
    if used + n > seq_len:
      groups.append([])
      used = 0
    groups[-1].append(example)
    used += n
  return lm_rows(groups, seq_len)


def classification_rows(
    examples: Sequence[ClassificationExample | None], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Pads each example to one row of ``seq_len`` tokens (None: an all-padding row).

  Args:
    examples: tokenized examples, each at most ``seq_len`` tokens, or None for padding rows.
    seq_len: the row length.
    pad_id: the id of the padding token.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids", "label", "example_mask"}``: the first three
    ``[rows, seq_len]``, ``label`` and ``example_mask`` (1 for a real example, 0 for a padding row)
    ``[rows]``; all int32.

  Example:
    >>> rows = classification_rows([ClassificationExample(np.array([2, 7, 3]), np.zeros(3), 1), None], 4, 0)
    >>> rows["input_ids"].tolist(), rows["attention_mask"].tolist(), rows["label"].tolist()
    ([[2, 7, 3, 0], [0, 0, 0, 0]], [[1, 1, 1, 0], [0, 0, 0, 0]], [1, 0])
  """
  num_rows = len(examples)
  rows = {
      "input_ids": np.full((num_rows, seq_len), pad_id, np.int32),
      "attention_mask": np.zeros((num_rows, seq_len), np.int32),
      "token_type_ids": np.zeros((num_rows, seq_len), np.int32),
      "label": np.zeros((num_rows,), np.int32),
      "example_mask": np.zeros((num_rows,), np.int32),
  }
  for r, example in enumerate(examples):
    if example is None:
      continue
    n = len(example.ids)
    if n > seq_len:
      raise ValueError(f"Row {r} has {n} tokens, more than seq_len={seq_len}.")
    rows["input_ids"][r, :n] = example.ids
    rows["attention_mask"][r, :n] = 1
    rows["token_type_ids"][r, :n] = example.type_ids
    rows["label"][r] = example.label
    rows["example_mask"][r] = 1
  return rows
