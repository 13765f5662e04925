"""``DataError``, and what happens to a bad example: raise it, or skip it and count it by reason."""

import dataclasses
import logging
from typing import Literal

OnBadExample = Literal["raise", "skip"]

# Reasons an example can be bad; ``on_bad_example="skip"`` counts skipped examples under these keys.
MALFORMED_JSON = "malformed_json"  # a JSONL line that does not parse as JSON
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
MISSING_FIELD = "missing_field"  # a required field is absent
WRONG_TYPE = "wrong_type"  # a field (or the line itself) has the wrong JSON type
BAD_VALUE = "bad_value"  # right type, unusable value: unknown role or label, empty completion, ...
OVER_LONG = "over_long"  # longer than seq_len after tokenization
NO_TARGET = "no_target_tokens"  # an LM example with no token to train on
# Never skippable: they leave nothing to train on.
EMPTY_FILE = "empty_file"
NO_EXAMPLES = "no_examples"
EXISTS = "exists"  # a built dataset of that name exists with other inputs


class DataError(ValueError):
  """Training data that cannot be used as given.

  The message names where (``path:line`` for local files, ``dataset[split] example i`` otherwise), why
  (``reason``, one of the keys above) and what to do. Subclassing ``ValueError`` keeps ``except
  ValueError`` handlers working.

  Attributes:
    reason: a short key such as ``"malformed_json"``, ``"over_long"`` or ``"empty_file"``.
    where: the place of the bad input, e.g. ``"train.jsonl:12"``, or None.
  """

  def __init__(self, message: str, *, reason: str, where: str | None = None):
    super().__init__(f"{where}: {message}" if where else message)
    self.reason = reason
    self.where = where


@dataclasses.dataclass(frozen=True)
class BadExample:
  """One example that cannot be used: ``reason`` (a key above) and a human ``detail``."""

  reason: str
  detail: str


def check_on_bad_example(on_bad_example: str) -> OnBadExample:
  """Returns ``on_bad_example`` after checking it is ``"raise"`` or ``"skip"``."""
  if on_bad_example not in ("raise", "skip"):
    raise ValueError(f"on_bad_example must be 'raise' or 'skip', got {on_bad_example!r}.")
  return on_bad_example


def format_skips(counts: dict[str, int]) -> str:
  """``{"over_long": 2, "malformed_json": 1}`` -> ``"3 skipped (malformed_json: 1, over_long: 2)"``."""
  total = sum(counts.values())
  if not total:
    return "0 skipped"
  return f"{total} skipped (" + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)) + ")"


_WARNED_CONTEXTS: set[str] = set()  # dataset splits whose first skip was already logged


class BadExamplePolicy:
  """Applies ``on_bad_example`` to bad examples: raise a ``DataError``, or count the skip by reason.

  ``counts`` holds the totals by reason. With ``warn_first``, the first skip is logged once with
  ``logging.warning`` (for long runs, where totals come late); otherwise the caller logs the totals.
  """

  def __init__(self, on_bad_example: str, context: str, *, warn_first: bool = True):
    self.on_bad_example = check_on_bad_example(on_bad_example)
    self.context = context
    self.counts: dict[str, int] = {}
    self._warned = not warn_first

  def handle(self, bad: BadExample, where: str, *, count: bool = True) -> None:
    """Raises ``DataError`` for ``bad`` at ``where``, or (skip mode) counts it when ``count``."""
    if self.on_bad_example == "raise":
      raise DataError(
          f"{bad.reason}: {bad.detail} (on_bad_example='skip' skips such examples and counts them)",
          reason=bad.reason,
          where=where,
      )
    if not count:
      return
    self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
    if not self._warned and self.context not in _WARNED_CONTEXTS:
      # Once per dataset split and process: every eval pass builds a fresh iterator over the same data.
      self._warned = True
      _WARNED_CONTEXTS.add(self.context)
      logging.warning(
          "%s: skipping bad examples (on_bad_example='skip'); first: %s: %s: %s. Totals are reported at the end.",
          self.context, where, bad.reason, bad.detail,
      )
