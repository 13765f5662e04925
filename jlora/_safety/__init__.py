"""Safe adapter loading: the checks every adapter load path of jlora applies.

* ``UnsafeAdapterError`` / ``AdapterNormWarning``: how refusals and suspicions are reported.
* ``LoadPolicy``: size caps, manifest requirement, norm-outlier thresholds and strictness.
* ``check_base_fingerprint``: the stored base fingerprint against the caller's base (a missing one is refused).
* ``read_safetensors``: a strict pure-Python safetensors reader (never pickle).
* ``write_manifest`` / ``verify_manifest``: ``SHA256SUMS`` files.
* ``norm_report`` / ``NormReport`` / ``NormRow``: per-module update norms and outliers.
"""

from jlora._safety._base_check import check_base_fingerprint
from jlora._safety._errors import AdapterNormWarning, UnsafeAdapterError
from jlora._safety._files import read_json, refuse_pickle_name
from jlora._safety._manifest import (
    MANIFEST,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from jlora._safety._norms import NormReport, NormRow, enforce_norms, norm_report
from jlora._safety._policy import LoadPolicy
from jlora._safety._safetensors import ALLOWED_DTYPES, SafetensorsFile, read_safetensors
from jlora._safety._trees import check_dtypes, check_finite

__all__ = [
    "ALLOWED_DTYPES",
    "MANIFEST",
    "AdapterNormWarning",
    "LoadPolicy",
    "NormReport",
    "NormRow",
    "SafetensorsFile",
    "UnsafeAdapterError",
    "check_base_fingerprint",
    "check_dtypes",
    "check_finite",
    "enforce_norms",
    "norm_report",
    "read_json",
    "read_manifest",
    "read_safetensors",
    "refuse_pickle_name",
    "verify_manifest",
    "write_manifest",
]
