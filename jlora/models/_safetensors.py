"""Reading and writing ``*.safetensors`` checkpoint directories with numpy (never torch).

bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays (safetensors' numpy backend).
"""

import contextlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np
import safetensors
import safetensors.numpy

from jlora.models._errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class SafetensorsReader:
  """Lazy access to the tensors of a checkpoint directory, sharded or not.

  Shards are listed by ``model.safetensors.index.json`` when present, otherwise every
  ``*.safetensors`` file of the directory is read. Use as a context manager (closes the files).

  Attributes:
    directory: the checkpoint directory.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    self._stack = contextlib.ExitStack()
    self._files: dict[str, object] = {}
    self._where: dict[str, str] = {}
    index = self.directory / INDEX_FILE
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      for name, file in weight_map.items():
        self._where[name] = file
      for file in sorted(set(weight_map.values())):
        self._open(file)
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      if not files:
        raise CheckpointError(f"No *.safetensors files in {self.directory} (pickled checkpoints are not read).")
      for file in files:
        for name in self._open(file).keys():
          if name in self._where:
            raise CheckpointError(f"Tensor {name!r} is in both {self._where[name]} and {file}.")
          self._where[name] = file

  def _open(self, file: str):
    path = self.directory / file
    if not path.exists():
      raise CheckpointError(f"Checkpoint shard {path} (listed in {INDEX_FILE}) does not exist.")
    handle = self._stack.enter_context(safetensors.safe_open(str(path), framework="np"))
    self._files[file] = handle
    return handle

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc_info) -> None:
    self._stack.close()

  def names(self) -> Iterator[str]:
    """Names of all tensors in the checkpoint."""
    return iter(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor ``name`` without reading it."""
    return tuple(self._files[self._where[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """Tensor ``name`` as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
    try:
      return self._files[self._where[name]].get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"Could not read tensor {name!r} from {self._where[name]}: {e}") from e

  def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``tensor[index]`` of tensor ``name``, reading only that part of the file (one slice per dimension)."""
    try:
      return self._files[self._where[name]].get_slice(name)[index]
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"Could not read {index} of tensor {name!r} from {self._where[name]}: {e}") from e


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes ``tensors`` to one ``.safetensors`` file that transformers loads (``format: pt``).

  Args:
    path: the file to write.
    tensors: name -> numpy array (any dtype safetensors knows, bfloat16 included).
  """
  contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
  safetensors.numpy.save_file(contiguous, str(path), metadata={"format": "pt"})
