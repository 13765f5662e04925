"""UnsafeAdapterError and AdapterNormWarning: how a refused or suspicious adapter is reported."""

from jlora._errors import JloraError


class UnsafeAdapterError(JloraError):
  """An adapter file or directory that jlora refuses to load.

  Raised by every adapter load path (``jlora.load_adapters``, ``jlora.peft.from_pretrained``, the
  ``jlora`` CLI) for: a pickle or other non-safetensors payload, a file or header over the size caps,
  a malformed safetensors header, a dtype outside float16/bfloat16/float32, a key set or shape that
  differs from what the config and base model imply, a NaN or infinity, a base-model fingerprint or
  name mismatch, a SHA-256 manifest mismatch, and (in strict mode) update norms that are outliers.
  The message says which file, tensor or module is wrong. A subclass of ``jlora.JloraError``, so
  ``except jlora.JloraError`` catches it.
  """


class AdapterNormWarning(UserWarning):
  """An adapter whose per-module update norms have outliers (see ``jlora.norm_report``).

  Warned by default on load; ``LoadPolicy(strict=True)`` turns it into an ``UnsafeAdapterError``.
  """
