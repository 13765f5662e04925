"""Deterministic, resumable, process-sharded batches over a random-access data source.

The stream: epoch ``e`` visits the ``N`` examples of the source in the order
``np.random.default_rng([seed, e]).permutation(N)`` (or ``0..N-1`` without shuffling); epochs follow
each other without a gap. Rows are filled from the stream in order (packed LM rows, or one example per
classification row) and ``batch_size`` rows make a global batch. An example that does not fit in the
current row starts the next row, so examples are never split and a batch boundary is just a position in
the stream: the state is ``(epoch, position)`` of the next unused example plus the skip counts, and
restoring it gives exactly the batches an uninterrupted iterator would give next. The state does not
depend on the batch size or the number of processes, so both may change on resume.

Multi-host: every process reads and tokenizes the whole global batch (packing needs every example's
length) and returns its own ``batch_size // process_count`` rows: process ``p`` gets rows
``[p * b, (p + 1) * b)``. Build the global array with ``jax.make_array_from_process_local_data``.

Bad examples found here (too long for ``seq_len``, ...) follow ``on_bad_example``: raise a ``DataError``
naming ``file:line`` (or the example index), or skip. Skips are counted in the first epoch only, so the
counts are distinct examples; the first skip is logged once, and ``report()`` gives the totals.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tokenizers

from train.data._encode import ClassificationEncoder, LMEncoder, TurnsFn
from train.data._errors import NO_EXAMPLES, BadExample, BadExamplePolicy, DataError, format_skips
from train.data._packing import classification_rows, lm_rows
from train.data._template import ChatTemplate

_STATE_KEYS = ("epoch", "position", "seed", "shuffle", "num_examples", "skipped")


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """How examples fill rows: a row holds examples whose ``size`` adds up to at most ``capacity``."""

  capacity: int
  size: Callable[[Any], int]
  rows: Callable[[list[list[Any]]], dict[str, np.ndarray]]  # groups of examples -> batch arrays


class _BadAt(NamedTuple):
  bad: BadExample
  where: str


def _source_name(source: Sequence[Any]) -> tuple[str, str | None]:
  info = getattr(source, "dataset_info", None)
  split = getattr(source, "split", None)
  name = info.full_name if info is not None else type(source).__name__
  return (f"{name}[{split}]" if split is not None else name), (str(split) if split is not None else None)


def _build_time_skips(source: Sequence[Any], split: str | None) -> dict[str, int]:
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None) or {}
  skipped = metadata.get("skipped") or {}
  return dict(skipped.get(split.split("[")[0], {})) if split is not None else {}


class BatchIterator:
  """Global batches of fixed size from a data source; see the module docstring.

  Iterate it (``next(it)``) for dicts of ``[batch_size // process_count, ...]`` int32 numpy arrays.
  ``get_state()`` / ``set_state()`` save and restore the position; ``skipped`` and ``report()`` tell
  what was left out. Build one with ``lm_batches`` or ``classification_batches``.
  """

  def __init__(
      self,
      source: Sequence[Mapping[str, Any]],
      encoder: Callable[[Sequence[Mapping[str, Any]]], list[Any]],
      layout: RowLayout,
      *,
      batch_size: int,
      seed: int = 0,
      shuffle: bool = True,
      num_epochs: int | None = None,
      process_index: int = 0,
      process_count: int = 1,
      on_bad_example: str = "raise",
      chunk_size: int = 256,
  ):
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    self.name, split = _source_name(source)
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise DataError(f"{self.name} has no example.", reason=NO_EXAMPLES)
    self.source = source
    self.encoder = encoder
    self.layout = layout
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed = int(seed)
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.process_index = process_index
    self.process_count = process_count
    self.chunk_size = chunk_size
    self.build_time_skipped = _build_time_skips(source, split)
    self._policy = BadExamplePolicy(on_bad_example, self.name)
    self._epoch = 0
    self._position = 0
    self._order_cache: tuple[int, np.ndarray] | None = None
    self._buffer: tuple[int, int, list[Any]] = (-1, 0, [])  # (epoch, first position, encoded examples)

  # The stream.

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        order = np.arange(self.num_examples)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def _where(self, index: int, record: Mapping[str, Any]) -> str:
    if "file" in record and "line" in record:
      file = record["file"]
      return f"{file.decode() if isinstance(file, bytes) else file}:{int(record['line'])}"
    return f"{self.name} example {index}"

  def _fill(self) -> None:
    indices = self._order(self._epoch)[self._position:self._position + self.chunk_size].tolist()
    getitems = getattr(self.source, "__getitems__", None)
    records = getitems(indices) if getitems is not None else [self.source[i] for i in indices]
    encoded = self.encoder(records)
    encoded = [
        _BadAt(item, self._where(index, record)) if isinstance(item, BadExample) else item
        for index, record, item in zip(indices, records, encoded)
    ]
    self._buffer = (self._epoch, self._position, encoded)

  def _exhausted(self) -> bool:
    return self.num_epochs is not None and self._epoch >= self.num_epochs

  def _advance(self) -> None:
    self._position += 1
    if self._position == self.num_examples:
      if self._epoch == 0:
        self._end_first_epoch()
      self._epoch += 1
      self._position = 0

  def _end_first_epoch(self) -> None:
    skipped = sum(self._policy.counts.values())
    if skipped == self.num_examples:
      raise DataError(
          f"every one of the {self.num_examples} examples of {self.name} was skipped "
          f"({format_skips(self._policy.counts)}).",
          reason=NO_EXAMPLES,
      )

  def _peek(self) -> Any | None:
    """The next good example at the cursor (skipping or raising on bad ones), or None at the end."""
    while not self._exhausted():
      epoch, start, items = self._buffer
      if epoch != self._epoch or not start <= self._position < start + len(items):
        self._fill()
        epoch, start, items = self._buffer
      item = items[self._position - start]
      if not isinstance(item, _BadAt):
        return item
      self._policy.handle(item.bad, item.where, count=self._epoch == 0)
      self._advance()
    return None

  # Iteration.

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    groups: list[list[Any]] = []
    while len(groups) < self.batch_size:
      group, used = [], 0
      while (example := self._peek()) is not None:
        size = self.layout.size(example)
        if group and used + size > self.layout.capacity:
          break
        group.append(example)
        used += size
        self._advance()
      if not group:
        break
      groups.append(group)
    if not groups:
      raise StopIteration
    groups += [[] for _ in range(self.batch_size - len(groups))]  # the last batch of a finite stream
    first = self.process_index * self.local_batch_size
    return self.layout.rows(groups[first:first + self.local_batch_size])

  # State.

  @property
  def epoch(self) -> int:
    """The epoch of the next example."""
    return self._epoch

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict: the stream position of the next batch and the skip counts."""
    return {
        "epoch": self._epoch,
        "position": self._position,
        "seed": self.seed,
        "shuffle": self.shuffle,
        "num_examples": self.num_examples,
        "skipped": dict(self._policy.counts),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a ``get_state()`` dict; the next batch is the one that followed it.

    Raises:
      ValueError: the state is malformed, or was saved for another seed, shuffling or data source size.
    """
    if set(state) != set(_STATE_KEYS):
      raise ValueError(f"Iterator state must have keys {sorted(_STATE_KEYS)}, got {sorted(state)}.")
    for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_examples", self.num_examples)):
      if state[key] != mine:
        raise ValueError(
            f"Iterator state was saved with {key}={state[key]!r}, this iterator has {key}={mine!r}: "
            "the example order would differ."
        )
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.num_examples:
      raise ValueError(f"Iterator state has epoch={epoch}, position={position} outside the data source.")
    self._epoch, self._position = epoch, position
    self._policy.counts = {str(k): int(v) for k, v in state["skipped"].items()}
    self._buffer = (-1, 0, [])

  # Reporting.

  @property
  def skipped(self) -> dict[str, int]:
    """Skipped examples by reason: when the dataset was built plus, so far, after tokenization."""
    total = dict(self.build_time_skipped)
    for reason, count in self._policy.counts.items():
      total[reason] = total.get(reason, 0) + count
    return total

  def report(self) -> str:
    """One line on what was skipped, when the dataset was built and after tokenization.

    For example ``"jlora_jsonl_instructions/sft/1.0.0[train]: when built 1 skipped (malformed_json: 1);
    after tokenization 2 skipped (over_long: 2)"``; counts after tokenization are final once the first
    epoch is done, which the line says when it is not.
    """
    text = (f"{self.name}: when built {format_skips(self.build_time_skipped)}; "
            f"after tokenization {format_skips(self._policy.counts)}")
    return text + ("" if self._epoch > 0 else " (first epoch not finished)")


def lm_batches(
    source: Sequence[Mapping[str, Any]],
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    template: ChatTemplate,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    on_bad_example: str = "raise",
    turns_fn: TurnsFn | None = None,
) -> BatchIterator:
  """Packed next-token batches from instruction or text records.

  Each record is rendered with ``template`` and tokenized (``LMEncoder``), then packed into rows of
  ``seq_len`` positions (``pack_lm_examples``): ``inputs``, ``targets``, ``loss_mask``, ``segment_ids``,
  ``positions``, each ``[batch_size // process_count, seq_len]`` int32.

  Args:
    source: a random-access data source (``data_source(...)``, or any sequence of record dicts).
    tokenizer: the tokenizer.
    seq_len: positions per row; an example of ``n`` tokens takes ``n - 1``.
    batch_size: rows per global batch (a multiple of ``process_count``).
    template: how turns render and which tokens are trained (``default_template(...)``).
    seed: the shuffle seed.
    shuffle: permute every epoch (``False``: source order, e.g. for evaluation).
    num_epochs: stop after this many passes (the last batch is padded with empty rows), or None.
    process_index: this process, ``jax.process_index()``.
    process_count: the number of processes, ``jax.process_count()``.
    on_bad_example: ``"raise"`` or ``"skip"`` examples that are too long or have nothing to train on.
    turns_fn: record -> ``(role, content)`` turns, for sources our ``record_turns`` does not understand.

  Returns:
    The iterator.

  Example:
    >>> import tokenizers
    >>> from train.data import default_template
    >>> words = ["</s>", "a", "b", "c"]
    >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "</s>"))
    >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    >>> source = [{"prompt": b"a b", "completion": b"c"}, {"text": b"c c"}]
    >>> it = lm_batches(source, tok, seq_len=6, batch_size=1, template=default_template("</s>"), shuffle=False)
    >>> batch = next(it)
    >>> batch["inputs"].tolist(), batch["loss_mask"].tolist(), batch["segment_ids"].tolist()
    ([[1, 2, 3, 3, 3, 0]], [[0, 1, 1, 1, 1, 0]], [[1, 1, 1, 2, 2, 0]])
    >>> it.get_state()
    {'epoch': 1, 'position': 0, 'seed': 0, 'shuffle': False, 'num_examples': 2, 'skipped': {}}
  """
  encoder = LMEncoder(tokenizer, template, seq_len, turns_fn)
  layout = RowLayout(capacity=seq_len, size=lambda example: example.num_positions,
                     rows=lambda groups: lm_rows(groups, seq_len))
  return BatchIterator(source, encoder, layout, batch_size=batch_size, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                       on_bad_example=on_bad_example)


def classification_batches(
    source: Sequence[Mapping[str, Any]],
    tokenizer: tokenizers.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    pad_token: str,
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    on_bad_example: str = "raise",
) -> BatchIterator:
  """Padded (not packed) classification batches: one example per row.

  Rows are ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[b, seq_len]`` and ``label``,
  ``example_mask`` ``[b]`` (0 for the padding rows of a finite stream's last batch), all int32, with
  ``b = batch_size // process_count``. The label must be an integer class index; when the source's
  ``label_field`` is a ``ClassLabel``, it is checked against the number of classes.

  Args:
    source: a random-access data source with ``text_field`` and ``label_field``.
    tokenizer: the tokenizer; its post-processor adds special tokens (``[CLS] ... [SEP]``).
    seq_len: tokens per row; longer examples are bad (``over_long``).
    batch_size: rows per global batch (a multiple of ``process_count``).
    pad_token: the padding token (must be in the vocabulary).
    text_field: the text's field name.
    label_field: the label's field name.
    seed: the shuffle seed.
    shuffle: permute every epoch.
    num_epochs: stop after this many passes, or None.
    process_index: this process, ``jax.process_index()``.
    process_count: the number of processes, ``jax.process_count()``.
    on_bad_example: ``"raise"`` or ``"skip"`` bad examples.

  Returns:
    The iterator.

  Example:
    >>> import tokenizers
    >>> words = ["<pad>", "great", "film", "dull"]
    >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<pad>"))
    >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    >>> source = [{"text": b"great film", "label": 1}, {"text": b"dull", "label": 0}, {"text": b"film", "label": 0}]
    >>> it = classification_batches(source, tok, seq_len=3, batch_size=2, pad_token="<pad>", shuffle=False,
    ...                             num_epochs=1)
    >>> [(b["input_ids"].tolist(), b["label"].tolist(), b["example_mask"].tolist()) for b in it]
    [([[1, 2, 0], [3, 0, 0]], [1, 0], [1, 1]), ([[2, 0, 0], [0, 0, 0]], [0, 0], [1, 0])]
  """
  pad_id = tokenizer.token_to_id(pad_token)
  if pad_id is None:
    raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary.")
  num_classes = None
  info = getattr(source, "dataset_info", None)
  if info is not None and label_field in info.features and hasattr(info.features[label_field], "num_classes"):
    num_classes = info.features[label_field].num_classes
  encoder = ClassificationEncoder(tokenizer, seq_len, text_field=text_field, label_field=label_field,
                                  num_classes=num_classes)
  layout = RowLayout(capacity=1, size=lambda example: 1,
                     rows=lambda groups: classification_rows([g[0] if g else None for g in groups], seq_len, pad_id))
  return BatchIterator(source, encoder, layout, batch_size=batch_size, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                       on_bad_example=on_bad_example)
