"""LoadPolicy: the limits and strictness every adapter load path applies."""

import dataclasses

from jlora._errors import JloraError


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadPolicy:
  """Limits and switches of the adapter safety checks.

  The checks that need no knobs always run: safetensors only (never pickle), a well-formed header,
  dtypes in float16/bfloat16/float32, exactly the expected keys and shapes, finite values, a matching
  base fingerprint, and a matching SHA-256 manifest when one is present.

  The base check: when the caller gives a base (``params``, or an expected fingerprint), the adapter
  must store a base fingerprint and it must match. An adapter that stores none is refused unless
  ``allow_missing_fingerprint=True``: deleting or renaming the stored fingerprint must not switch the
  check off. Hugging Face PEFT's own ``save_pretrained`` stores no fingerprint, so genuine PEFT
  adapters need the allowance; jlora's writers store one whenever they are given the base.

  Attributes:
    max_file_bytes: largest adapter file read (checked with ``stat`` before any read).
    max_header_bytes: largest safetensors JSON header; the 8-byte declared length is checked before
      the header is read, so a huge declared size allocates nothing.
    max_json_bytes: largest ``adapter_config.json`` / ``jlora_adapter.json`` / manifest.
    require_manifest: refuse a directory without a ``SHA256SUMS`` manifest.
    strict: refuse (instead of warn about) adapters whose update norms are flagged by the norm report.
    allow_missing_fingerprint: load an adapter that stores no base fingerprint although the caller
      gave a base (e.g. a genuine PEFT adapter); its base then cannot be checked. An explicitly
      expected fingerprint (``expected_fingerprint=``, ``--expected-fingerprint``) is still required.
    outlier_z: robust z-score (on log norm ratios, MAD-based) above which a module is an outlier ...
    outlier_ratio: ... if its ratio is also this many times the median ratio.
    max_relative_update: a module whose ``||s A@B||_F / ||W||_F`` exceeds this is flagged regardless.

  Example:
    >>> import jlora
    >>> jlora.LoadPolicy(strict=True).max_header_bytes
    16777216
  """

  max_file_bytes: int = 8 << 30
  max_header_bytes: int = 16 << 20
  max_json_bytes: int = 4 << 20
  require_manifest: bool = False
  strict: bool = False
  allow_missing_fingerprint: bool = False
  outlier_z: float = 6.0
  outlier_ratio: float = 5.0
  max_relative_update: float = 1.0

  def __post_init__(self):
    for name in ("max_file_bytes", "max_header_bytes", "max_json_bytes"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise JloraError(f"LoadPolicy.{name} must be a positive int, got {value!r}.")
    for name in ("outlier_z", "outlier_ratio", "max_relative_update"):
      if not getattr(self, name) > 0:
        raise JloraError(f"LoadPolicy.{name} must be positive, got {getattr(self, name)!r}.")
