"""A real-text classification task that ships with Python: which library area is a docstring from?

Each example is the first paragraph of the docstring of a public function or class of a standard
library module, labelled with the area its module belongs to (7 classes, ~690 examples on CPython
3.11). The split is a deterministic 80/20 hash split of the text, so train and validation never
share a docstring. Nothing is downloaded: the text comes from the running interpreter.
"""

import hashlib
import importlib
import inspect
import json

from train.tasks.base import write_splits

AREAS: dict[str, tuple[str, ...]] = {
    "files & processes": ("os", "shutil", "pathlib", "subprocess", "tempfile", "glob", "fnmatch", "stat", "filecmp",
                          "zipfile", "tarfile"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext"),
    "numbers & math": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "networking & web": ("socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request",
                         "urllib.parse", "email.message", "email.utils", "smtplib", "ftplib", "ipaddress", "mailbox"),
    "dates & time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "concurrency": ("threading", "multiprocessing", "concurrent.futures", "asyncio", "queue", "selectors", "signal"),
    "data formats": ("json", "csv", "pickle", "xml.etree.ElementTree", "html.parser", "configparser", "base64",
                     "binascii", "struct", "plistlib", "tomllib", "sqlite3"),
}
LABELS = tuple(AREAS)


def _documented(module_name: str):
  module = importlib.import_module(module_name)
  root = module_name.split(".")[0]
  for attr in sorted(dir(module)):
    if attr.startswith("_"):
      continue
    obj = getattr(module, attr)
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)
            or inspect.ismethoddescriptor(obj)):
      continue
    if not str(getattr(obj, "__module__", "") or "").lstrip("_").startswith(root):
      continue  # re-exported from elsewhere
    doc = inspect.getdoc(obj)
    if doc:
      yield doc.split("\n\n")[0].replace("\n", " ").strip()


def examples() -> list[dict]:
  """All ``{"text", "label"}`` examples, deduplicated, in a deterministic order."""
  seen, out = set(), []
  for label, modules in AREAS.items():
    for name in modules:
      for text in _documented(name):
        if len(text) >= 25 and text not in seen:
          seen.add(text)
          out.append({"text": text, "label": label})
  return out


def _split(text: str, validation_fraction: float) -> str:
  bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  return "validation" if bucket < validation_fraction else "train"


def write_jsonl(directory: str, validation_fraction: float = 0.2) -> dict[str, str]:
  """Writes ``train.jsonl`` and ``validation.jsonl`` into ``directory``; returns ``{split: path}``."""
  lines: dict[str, list[str]] = {"train": [], "validation": []}
  for example in examples():
    lines[_split(example["text"], validation_fraction)].append(json.dumps(example) + "\n")
  return write_splits(directory, lines)
