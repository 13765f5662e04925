"""A PiSSA/OLoRA adapter as a plain LoRA on the original base (PEFT's ``path_initial_model_for_weight_conversion``).

PiSSA/OLoRA train ``A, B`` on the residual ``W_res = W - s·A0@B0``. What training changed is
``W_res + s·A@B - W = s·(A@B - A0@B0) = s·[A | A0] @ [B ; -B0]``: a rank-``2r`` LoRA on ``W`` itself, with the
same scale when ``alpha`` doubles with the rank (``alpha / r``; ``sqrt(2)·alpha`` under rsLoRA). PEFT writes
exactly that; so does this function.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp

from jlora import _paths
from jlora._config import LoraConfig
from jlora._errors import JloraError


def to_plain_lora(adapters: Mapping, initial: Mapping, config: LoraConfig, targets: Mapping) -> tuple[dict, LoraConfig]:
  """The rank-``2r`` plain LoRA that applies to the original base what a PiSSA/OLoRA adapter applies to its residual.

  Args:
    adapters: the trained adapter tree.
    initial: the adapter tree as ``init_with_base`` returned it (``A0``, ``B0``).
    config: their ``LoraConfig`` (``init`` is ``"pissa"``, ``"pissa_niter_K"`` or ``"olora"``).
    targets: ``lora.targets`` (the layouts say where each factor's rank axis is).

  Returns:
    ``(adapters, config)``: factors ``[A | A0]`` and ``[B ; -B0]``, and the config with doubled ranks,
    ``alpha`` doubled (``sqrt(2)`` times under rsLoRA, so every scale is unchanged) and ``init`` reset.

  Raises:
    JloraError: the config is not PiSSA/OLoRA, is DoRA (its magnitude is relative to the residual), or the
      trees do not match the targets.
  """
  if not config.rewrites_base:
    raise JloraError(f"to_plain_lora converts PiSSA/OLoRA adapters; this config has init={config.init!r}, whose "
                     "adapters already apply to the original base.")
  if config.use_dora:
    raise JloraError("to_plain_lora: a DoRA adapter's magnitude is relative to the residual base, so it has no exact "
                     "plain-LoRA form on the original base; merge it instead (Lora.merge on the residual params).")
  out = {}
  for path, target in targets.items():
    keys = tuple(path.split("/"))
    if not (_paths.contains(adapters, keys) and _paths.contains(initial, keys)):
      raise JloraError(f"to_plain_lora: no adapter for target '{path}' in both trees.")
    node, start = _paths.get(adapters, keys), _paths.get(initial, keys)
    for name in ("lora_a", "lora_b"):
      if node[name].shape != start[name].shape:
        raise JloraError(f"to_plain_lora: '{path}/{name}' is {node[name].shape} trained but {start[name].shape} at "
                         "init: these trees are not the same adapter.")
    rank_axis_b = len(target.stack_shape) + len(target.layout.batch_axes)
    out[keys] = {"lora_a": jnp.concatenate([node["lora_a"], start["lora_a"]], axis=-1),
                 "lora_b": jnp.concatenate([node["lora_b"], -start["lora_b"]], axis=rank_axis_b)}
  if sum(1 for _ in _paths.iter_leaves(adapters)) != 2 * len(out):
    raise JloraError("to_plain_lora: the adapter tree has leaves outside the targets' {lora_a, lora_b} adapters.")
  factor = math.sqrt(2.0) if config.use_rslora else 2.0
  converted = dataclasses.replace(
      config, rank=2 * config.rank, alpha=factor * config.alpha, init="kaiming_uniform",
      rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
      alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
  return _paths.nest(out), converted
