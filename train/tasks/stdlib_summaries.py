"""A real-text generation task that ships with Python: from a function's signature, write its summary line.

Each example is one public function of a standard-library module: the user turn is its qualified name
and signature (``json.dumps(obj, *, skipkeys=False, ...)``, from ``inspect.signature``), the assistant
turn the first line of its docstring (``Serialize ``obj`` to a JSON formatted ``str``.``). About 1,200
examples from ~140 modules on CPython 3.11. Nothing is downloaded: the text comes from the interpreter.

Kept: functions (Python or builtin) defined in the module that exposes them (``os.scandir`` counts once,
under ``posix``), with a signature ``inspect`` can read, whose docstring starts with a one-line paragraph
of 10-120 characters that is not a signature or a doctest; a (name, summary) pair seen before is
dropped. Memory addresses in default values (``<function <lambda> at 0x7f...>``) are removed so that
the data are the same on every run.

Split by *module* (a hash of its name), so held-out examples come from modules never seen in
training: ``validation`` gets ~15% of the modules (``logging``, ``inspect``, ``sqlite3``, ... with the
default fraction).

The modules are imported in a subprocess: importing the whole standard library has side effects
(``readline``, ``curses``, warnings) that the training process should not inherit.
"""

import hashlib
import json
import os
import subprocess
import sys

# Shown as the system turn of every example: what the model is asked to do.
SYSTEM_PROMPT = "Write the first line of the docstring of this Python standard-library function."
# Not imported: they open windows or browsers, print on import, are tests or Windows-only.
SKIPPED_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "ensurepip", "venv",
    "pydoc_data", "msvcrt", "winreg", "winsound", "msilib", "nturl2path", "xxsubtype",
})
_MAX_SIGNATURE = 120  # characters; longer signatures (a dozen keyword arguments) are left out


def collect() -> list[dict]:
  """Imports the standard library *in this process* and returns every kept example, in a fixed order.

  Returns:
    ``[{"module", "function", "signature", "summary"}, ...]`` sorted by module, then function.
  """
  import contextlib
  import importlib
  import inspect
  import io
  import re
  import warnings

  seen, out = set(), []
  for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIPPED_MODULES):
    try:
      with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
          contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    except Exception:  # not importable here (missing C library, other platform): not part of the task
      continue
    for attr in sorted(vars(module)):
      obj = getattr(module, attr)
      if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        continue
      home = str(getattr(obj, "__module__", "") or "")
      if home.lstrip("_") != name and not home.startswith(name + "."):
        continue  # re-exported from another module: it is an example there
      try:
        signature = re.sub(r" at 0x[0-9a-fA-F]+", "", str(inspect.signature(obj)))
      except (TypeError, ValueError):
        continue
      doc = inspect.getdoc(obj) or ""
      summary = doc.strip().split("\n\n")[0].strip()
      if ("\n" in summary or not 10 <= len(summary) <= 120 or summary.startswith((">>>", attr + "("))
          or len(signature) > _MAX_SIGNATURE or (attr, summary) in seen):
        continue
      seen.add((attr, summary))
      out.append({"module": name, "function": attr, "signature": signature, "summary": summary})
  return out


def examples() -> list[dict]:
  """``collect()`` run in a fresh interpreter: ``python -I`` on this file (no jax, no job state, and this
  directory is not on ``sys.path``, so no file here can shadow a standard-library module)."""
  done = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)], capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"Collecting the standard-library examples failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout)


def split_of(module: str, validation_fraction: float) -> str:
  """``"validation"`` for a ``validation_fraction`` share of module names (by a hash of the name), else ``"train"``."""
  bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  return "validation" if bucket < validation_fraction else "train"


def messages(example: dict) -> list[dict]:
  """The chat of one example: system (the task), user (name and signature), assistant (the summary)."""
  return [{"role": "system", "content": SYSTEM_PROMPT},
          {"role": "user", "content": f"{example['module']}.{example['function']}{example['signature']}"},
          {"role": "assistant", "content": example["summary"]}]


def write_jsonl(directory: str, validation_fraction: float = 0.15) -> dict[str, str]:
  """Writes ``train.jsonl`` and ``validation.jsonl`` of ``{"messages", "module", "function"}`` lines.

  Args:
    directory: created if needed.
    validation_fraction: the share of modules held out (see ``split_of``).

  Returns:
    ``{split: path}``.
  """
  from train.tasks.base import write_splits  # here: this file also runs as a script (``examples``), alone

  lines: dict[str, list[str]] = {split: [] for split in ("train", "validation")}
  for example in examples():
    record = {"messages": messages(example), "module": example["module"], "function": example["function"]}
    lines[split_of(example["module"], validation_fraction)].append(json.dumps(record) + "\n")
  for split in lines:
    if not lines[split]:
      raise RuntimeError(f"No standard-library example fell into the {split!r} split "
                         f"(validation_fraction={validation_fraction}).")
  return write_splits(directory, lines)


if __name__ == "__main__":  # examples(): the collection, as JSON on stdout
  json.dump(collect(), sys.stdout)
