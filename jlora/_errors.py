"""The one exception type jlora raises for user-facing problems."""


class JloraError(ValueError):
  """A LoRA config, adapter tree or model that jlora cannot use as given.

  The message says what is wrong and what to do about it. Subclassing ``ValueError`` keeps
  ``except ValueError`` handlers in user code working.
  """
