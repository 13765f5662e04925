"""A local text file as numbered units: lines, paragraphs or the whole document, checked for UTF-8."""

import os
from collections.abc import Iterator
from typing import Literal

from train.data._errors import EMPTY_FILE, INVALID_UTF8, BadExample, DataError

Unit = Literal["line", "paragraph", "document"]
UNITS = ("line", "paragraph", "document")


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None]]:
  """Yields ``(line_number, text without the line break)``, or None as text for a line that is not UTF-8."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
      except UnicodeDecodeError:
        yield number, None
        continue
      yield number, text.rstrip("\r\n")


def read_units(path: str | os.PathLike, unit: Unit = "line") -> Iterator[tuple[int, str | BadExample]]:
  """Yields the units of a text file with the 1-based number of their first line.

  Blank (whitespace-only) lines are separators, never units: ``"line"`` yields every other line,
  ``"paragraph"`` every block of consecutive non-blank lines joined by ``"\\n"``, ``"document"`` one unit
  from the first to the last non-blank line. A unit holding bytes that are not UTF-8 is yielded as a
  ``BadExample`` (reason ``invalid_utf8``) instead of its text.

  Args:
    path: the file.
    unit: ``"line"``, ``"paragraph"`` or ``"document"``.

  Yields:
    ``(line_number, text_or_bad)``.

  Raises:
    DataError: (reason ``empty_file``, after the last unit) the file has no non-blank line.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_text("one\\ntwo\\n\\n\\nthree\\n")
    >>> list(read_units(path, "line"))
    [(1, 'one'), (2, 'two'), (5, 'three')]
    >>> list(read_units(path, "paragraph"))
    [(1, 'one\\ntwo'), (5, 'three')]
  """
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
  count = 0
  block: list[tuple[int, str | None]] = []  # the pending paragraph or document (blank lines kept inside)

  def flush() -> tuple[int, str | BadExample]:
    while block and block[-1][1] is not None and not block[-1][1].strip():
      block.pop()  # trailing blank lines of a document
    first = block[0][0]
    bad = [number for number, text in block if text is None]
    if bad:
      return first, BadExample(INVALID_UTF8, f"line {bad[0]} is not valid UTF-8")
    return first, "\n".join(text for _, text in block)

  for number, text in _lines(path):
    blank = text is not None and not text.strip()
    if unit == "line":
      if not blank:
        count += 1
        yield number, (text if text is not None else BadExample(INVALID_UTF8, "the line is not valid UTF-8"))
    elif unit == "paragraph":
      if blank and block:
        count += 1
        yield flush()
        block.clear()
      elif not blank:
        block.append((number, text))
    elif block or not blank:
      block.append((number, text))
  if block:
    count += 1
    yield flush()
  if count == 0:
    raise DataError("the file is empty (no non-blank line)", reason=EMPTY_FILE, where=str(path))
