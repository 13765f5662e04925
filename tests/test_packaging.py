"""The wheel `pip install jlora` gets: one top-level package, `jlora`, and a `jlora` command inside it."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Never part of a source tree that is packaged: environments, VCS data, build outputs, job outputs.
_NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "workdir*", "__pycache__", "*.egg-info", "build", "dist",
                                     ".pytest_cache", ".ruff_cache")


def test_wheel_holds_only_the_jlora_package_and_its_command(tmp_path):
  # pip builds in the source directory (build/, *.egg-info), so build from a copy of the working tree.
  source = tmp_path / "source"
  shutil.copytree(ROOT, source, ignore=_NOT_SOURCE, symlinks=True)
  assert (source / "tools" / "__init__.py").exists()  # the repository's scripts are there to be left out
  # No network and no build isolation: the environment's setuptools builds it, as it would offline.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                  "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("jlora-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    (dist_info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
  assert {name.split("/")[0] for name in names} == {"jlora", dist_info}, sorted({n.split("/")[0] for n in names})
  assert "jlora/cli.py" in names and "jlora/__main__.py" in names
  assert entry_points.split() == ["[console_scripts]", "jlora", "=", "jlora.cli:main"]

  # Installed from the wheel alone (no checkout on the path), the console script runs.
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                  str(target), str(wheel)], check=True, timeout=300)
  env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
  script = target / "bin" / "jlora"
  done = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "import-peft" in done.stdout and "safety checks" in done.stdout
  # ... and it was the wheel's jlora that ran (find_spec locates the package without importing it).
  locate = "import importlib.util; print(importlib.util.find_spec('jlora').origin)"
  where = subprocess.run([sys.executable, "-c", locate], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
  assert where.stdout.strip() == str(target / "jlora" / "__init__.py"), where.stderr
