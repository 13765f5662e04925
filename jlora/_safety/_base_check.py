"""The base check every adapter load path applies: the stored base fingerprint against the caller's base."""

from jlora._safety._errors import UnsafeAdapterError
from jlora._safety._policy import LoadPolicy

ALLOWANCE = ("policy=jlora.LoadPolicy(allow_missing_fingerprint=True) (LoadPolicy.allow_missing_fingerprint; "
             "CLI: --allow-missing-fingerprint)")


def check_base_fingerprint(stored: str | None, base: str | None, policy: LoadPolicy, where: str, field: str,
                           hint: str = "") -> None:
  """Refuses an adapter whose stored fingerprint differs from ``base``, or that stores none.

  Args:
    stored: the fingerprint the adapter file carries, or None when it carries none.
    base: the fingerprint of the caller's base model, or None when the caller gave no base (then
      there is nothing to check).
    policy: ``allow_missing_fingerprint`` lets an adapter without a stored fingerprint load.
    where: the adapter, for the message.
    field: where the fingerprint is stored in the file, for the message.
    hint: a sentence on which adapters legitimately carry none.

  Raises:
    UnsafeAdapterError: a mismatch, or no stored fingerprint without the allowance.
  """
  if base is None:
    return
  if stored is None:
    if policy.allow_missing_fingerprint:
      return
    raise UnsafeAdapterError(
        f"{where} stores no base fingerprint ({field}), so nothing shows that it was trained on this base model; "
        f"refused, since a stripped fingerprint must not switch the base check off. {hint}To load it without the "
        f"base check, pass {ALLOWANCE}.")
  if stored != base:
    raise UnsafeAdapterError(f"{where} was trained on a different base model (fingerprint {stored}, this base "
                             f"{base}).")
