"""Stacking identical layers: a Python loop (``layers_0``, ``layers_1``, ...) or ``nn.scan``, with remat."""

from typing import Any, Literal

import flax.linen as nn
import jax

from jlora._errors import JloraError

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _check_remat(remat: str) -> None:
  if remat != "none" and remat not in _POLICIES:
    raise JloraError(f"remat must be one of {['none', *_POLICIES]}, got {remat!r}.")


def apply_layers(
    block: type[nn.Module],
    carry: Any,
    *broadcast_args: Any,
    num_layers: int,
    scan: bool,
    remat: RematPolicy,
    name: str,
    **block_attributes: Any,
) -> Any:
  """Applies ``num_layers`` fresh instances of ``block`` in sequence; call from a compact method.

  ``block.__call__(carry, *broadcast_args)`` must return ``(carry, None)``. With ``scan`` the layers
  are one ``nn.scan``-ned module called ``name`` whose ``params`` and ``cache`` variables have a
  leading layer axis; without it they are modules ``{name}_0``, ``{name}_1``, ...

  Args:
    block: the layer class.
    carry: the hidden state threaded through the layers.
    *broadcast_args: arguments shared by every layer (masks, rotary tables, ...).
    num_layers: how many layers.
    scan: stack with ``nn.scan`` (one compiled layer body) instead of unrolling.
    remat: ``"none"``, ``"full"`` (recompute everything), ``"dots"`` (save matmul outputs) or
      ``"dots_no_batch"`` (save matmul outputs without batch dimensions) for the backward pass.
    name: module name of the stack (the Hugging Face module list name, e.g. ``"layers"``, ``"h"``).
    **block_attributes: attributes of every layer instance.

  Returns:
    The final carry.
  """
  _check_remat(remat)
  if remat != "none":
    block = nn.remat(block, policy=_POLICIES[remat], prevent_cse=not scan)
  if scan:
    stacked = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(broadcast_args),
        length=num_layers,
    )
    carry, _ = stacked(name=name, **block_attributes)(carry, *broadcast_args)
    return carry
  for i in range(num_layers):
    carry, _ = block(name=f"{name}_{i}", **block_attributes)(carry, *broadcast_args)
  return carry
