"""CheckpointError: a Hugging Face checkpoint that does not fit the model it is loaded into."""

from jlora._errors import JloraError


class CheckpointError(JloraError):
  """A checkpoint directory, config or tensor that ``jlora.models`` cannot load or write as given.

  The message names the offending file, config field or tensor. Subclasses ``jlora.JloraError``
  (itself a ``ValueError``), so ``except ValueError`` keeps working.
  """
