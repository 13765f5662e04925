"""README: jlora never imports torch, transformers or peft (they are test-only references).

Every module of the package (public and private, jlora.nnx, jlora.peft, jlora.sharding, jlora.models, the CLI and
``python -m jlora``'s ``__main__``) is imported in a fresh interpreter, which then lists what ``sys.modules`` holds.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "transformers", "peft")

_IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
forbidden = set(sys.argv[1:])


def loaded():
  return sorted({name.split(".")[0] for name in sys.modules} & forbidden)


import jlora
names, culprits = ["jlora"], {"jlora": loaded()}
for info in pkgutil.walk_packages(jlora.__path__, "jlora."):
  before = loaded()
  importlib.import_module(info.name)  # __main__ too: imported, not run (its __name__ is jlora.__main__)
  names.append(info.name)
  culprits[info.name] = sorted(set(loaded()) - set(before))
print(json.dumps({"modules": names, "culprits": {k: v for k, v in culprits.items() if v}}))
"""


def test_importing_every_jlora_module_loads_no_torch_transformers_or_peft():
  result = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING, *FORBIDDEN], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  # The walk saw every Python file of the package, so no module escaped the check.
  on_disk = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for path in (ROOT / "jlora").rglob("*.py")}
  assert set(report["modules"]) == on_disk
  assert {"jlora.nnx", "jlora.peft", "jlora.sharding", "jlora.models", "jlora.cli", "jlora.__main__"} <= on_disk
  assert report["culprits"] == {}, f"{{jlora module: what importing it loaded}}: {report['culprits']}"


_JOB_IMPORTS = """
import json, sys, tempfile
import train.train  # the whole training job
from train.metrics import MetricWriter

writer = MetricWriter(tempfile.mkdtemp())  # imports tensorboardX, which imports torch whenever it can
writer.write(1, {"train/loss": 1.0})
writer.close()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:]))))
"""


def test_the_training_job_loads_no_torch_transformers_or_peft():
  """torch is installed here (test extras); the job's processes must not pay for importing it anyway."""
  result = subprocess.run([sys.executable, "-c", _JOB_IMPORTS, *FORBIDDEN], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []
