"""Activation functions by their Hugging Face config names (``hidden_act``, ``activation_function``)."""

import functools
from collections.abc import Callable

import jax

from jlora._errors import JloraError

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    # Both names are the tanh approximation (torch's gelu(approximate="tanh")).
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function called ``name`` in Hugging Face configs.

  Args:
    name: e.g. ``"silu"``, ``"gelu"`` (exact, erf-based), ``"gelu_new"`` / ``"gelu_pytorch_tanh"``
      (tanh approximation).

  Returns:
    An elementwise function.
  """
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise JloraError(
        f"Unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}."
    ) from None
