"""Reading files as numbered units (train/data/_units.py): lines, paragraphs, documents, UTF-8, empty files."""

import pytest

from train.data import DataError
from train.data._errors import BadExample
from train.data._units import read_units

TEXT = b"alpha\n  beta gamma  \n\n \t\ndelta\r\nepsilon\n\n"


def _write(tmp_path, content: bytes, name="f.txt"):
  path = tmp_path / name
  path.write_bytes(content)
  return path


def test_lines_skip_blank_lines_and_keep_numbers(tmp_path):
  path = _write(tmp_path, TEXT)
  assert list(read_units(path, "line")) == [(1, "alpha"), (2, "  beta gamma  "), (5, "delta"), (6, "epsilon")]


def test_paragraphs_and_document(tmp_path):
  path = _write(tmp_path, b"\n" + TEXT)
  assert list(read_units(path, "paragraph")) == [(2, "alpha\n  beta gamma  "), (6, "delta\nepsilon")]
  assert list(read_units(path, "document")) == [(2, "alpha\n  beta gamma  \n\n \t\ndelta\nepsilon")]


def test_utf8_bom_is_dropped(tmp_path):
  path = _write(tmp_path, "\ufeffhé\n".encode("utf-8"))
  assert list(read_units(path, "line")) == [(1, "hé")]


def test_invalid_utf8_is_a_bad_unit_with_its_line(tmp_path):
  path = _write(tmp_path, b"good\nbad \xff byte\n\nnext \xfe\nfine\n")
  assert list(read_units(path, "line")) == [
      (1, "good"), (2, BadExample("invalid_utf8", "the line is not valid UTF-8")),
      (4, BadExample("invalid_utf8", "the line is not valid UTF-8")), (5, "fine"),
  ]
  assert list(read_units(path, "paragraph")) == [
      (1, BadExample("invalid_utf8", "line 2 is not valid UTF-8")),
      (4, BadExample("invalid_utf8", "line 4 is not valid UTF-8")),
  ]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n"])
@pytest.mark.parametrize("unit", ["line", "paragraph", "document"])
def test_empty_file_is_always_an_error(tmp_path, content, unit):
  path = _write(tmp_path, content)
  with pytest.raises(DataError, match=r"f\.txt: the file is empty \(no non-blank line\)") as e:
    list(read_units(path, unit))
  assert e.value.reason == "empty_file"
  assert e.value.where == str(path)


def test_unknown_unit(tmp_path):
  with pytest.raises(ValueError, match="unit must be one of"):
    list(read_units(_write(tmp_path, b"x\n"), "sentence"))
