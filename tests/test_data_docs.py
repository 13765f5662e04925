"""The docstring examples of train/data run as doctests (pytest's --doctest-modules only covers jlora/)."""

import doctest
import importlib
import pkgutil
import tempfile

import pytest

import train.data

MODULES = ["train.data"] + [f"train.data.{m.name}" for m in pkgutil.iter_modules(train.data.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' temporary files go to pytest's tmp_path
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed (see stdout)"


def test_public_functions_have_examples():
  finder = doctest.DocTestFinder()
  without = [name for name in train.data.__all__
             if name not in ("DataError", "BatchIterator", "ChatTemplate", "RoleFormat", "LMExample",
                             "default_template")
             and not any(t.examples for t in finder.find(getattr(train.data, name), name))]
  assert not without, f"public functions without a docstring example: {without}"
