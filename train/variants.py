"""The job's adapter variant, from ``config.lora``: its LoraConfig and what the job adds around some variants.

* ``lora_config(config)``: the ``jlora.LoraConfig`` of ``config.lora``. Unset (``None``) options take the
  variant's defaults; AdaLoRA's ``total_step`` is ``train.steps``.
* ``check(config, lora_config)``: refuses combinations the job cannot train or export, before any work.
* ``base_changes(params, new_params)`` / ``overlay(params, changes)`` / ``change_specs``: what ``Lora.init_with_base`` changed in the
  frozen base (PiSSA/OLoRA's residual kernels, VeRA's shared projections), and that change applied again. The
  job recomputes it at every start from the base file and the seed (deterministic), so checkpoints hold adapters
  and optimizer state only, never a second base.
* ``wrap_loss(loss, lora_config)``: AdaLoRA's weighted orthogonal regulariser added to the task loss (as PEFT
  adds it to the model's loss; the logged ``train/loss`` includes it).
* ``exported(...)``: the adapter as the job exports it, and the base it applies to: PiSSA/OLoRA converted to the
  rank-``2r`` plain LoRA on the *original* base (``jlora.variants.to_plain_lora``), AdaLoRA sliced to the ranks
  its allocator kept (``jlora.adalora_resize``), every other variant as trained (VeRA on the base with its
  projections).

AdaLoRA's rank allocator is part of the optimizer (``train.optimizer.make_optimizer``), so its scores and masks
live in the optimizer state and checkpoints resume the allocation exactly.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

import jlora


def lora_config(config: ml_collections.ConfigDict) -> jlora.LoraConfig:
  """``jlora.LoraConfig(**config.lora)`` without the unset options; AdaLoRA's ``total_step`` is ``train.steps``."""
  fields = {name: value for name, value in config.lora.items() if value is not None}
  if fields.get("variant") == "adalora":
    fields["total_step"] = config.train.steps
  return jlora.LoraConfig(**fields)


def check(config: ml_collections.ConfigDict, lora_config: jlora.LoraConfig) -> None:
  """Refuses what the job cannot train or export, naming the fields to change.

  Raises:
    ValueError: DoRA over a PiSSA/OLoRA residual (its magnitude is relative to the residual, so no adapter on the
      original base exists to export), or ReLoRA (``relora.every``) with a variant or base it cannot restart.
  """
  if lora_config.use_dora and lora_config.rewrites_base:
    raise ValueError(f"config.lora.use_dora=True with init={lora_config.init!r}: a DoRA magnitude trained over the "
                     "PiSSA/OLoRA residual has no plain-LoRA form on the original base, so the job could not export "
                     "the adapter. Use one of them.")
  relora = config.get("relora")
  if relora is None or not relora.every:
    return
  activated = getattr(lora_config, "invocation_tokens", None) is not None  # activated LoRA
  if lora_config.variant != "lora" or lora_config.rewrites_base or activated:
    raise ValueError(f"config.relora.every={relora.every}: ReLoRA restarts LoRA and DoRA adapters with a random init; "
                     f"config.lora has variant={lora_config.variant!r}, init={lora_config.init!r}"
                     f"{', invocation_tokens' if activated else ''}. Set "
                     "config.relora.every=0 or config.lora.variant='lora' with init='kaiming_uniform' or 'gaussian'.")
  if config.model.get("quantize"):
    raise ValueError(f"config.relora.every={relora.every} with config.model.quantize={config.model.quantize!r}: "
                     "ReLoRA folds every cycle into the base, which a quantized base would requantize (lossy) at each "
                     "restart. Train ReLoRA over a float base (config.model.quantize='').")
  if relora.every >= config.train.steps:
    raise ValueError(f"config.relora.every={relora.every} >= train.steps={config.train.steps}: the run would never "
                     "restart. Lower relora.every, or set it to 0 for plain LoRA.")
  if not 0.0 <= relora.keep_fraction <= 1.0 or relora.warmup_steps < 0:
    raise ValueError(f"config.relora.keep_fraction must be in [0, 1] and warmup_steps >= 0, got "
                     f"{relora.keep_fraction!r} and {relora.warmup_steps!r}.")


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """``{path: value}`` of a nested mapping's non-mapping values (arrays, quantized kernels)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def base_changes(params: Mapping, new_params: Mapping) -> dict:
  """The entries of ``new_params`` that are not ``params``' own (by identity: ``init_with_base`` shares what it keeps;
  traced under ``jax.jit``, so only the changes are outputs), as a nested dict."""
  old = _flat(params)
  return _nest({path: value for path, value in _flat(new_params).items() if old.get(path) is not value})


def overlay(params: Mapping, changes: Mapping) -> dict:
  """``params`` with ``changes`` (a nested dict) in place; every other entry shared."""
  if not changes:
    return params
  out = dict(params)
  for key, value in changes.items():
    out[key] = overlay(params[key], value) if isinstance(value, Mapping) and isinstance(
        params.get(key), Mapping) else value
  return out


def change_specs(changes: Mapping, param_specs: Mapping) -> dict:
  """Partition specs of ``base_changes``: a replaced entry keeps the spec of the one it replaces (a residual kernel
  is split like the kernel), a new one (VeRA's shared projections) is replicated."""
  specs = _flat(param_specs)
  return _nest({path: specs[path] if path in specs else jax.tree.map(lambda _: P(), value)
                for path, value in _flat(changes).items()})


def wrap_loss(loss: Callable, lora_config: jlora.LoraConfig) -> Callable:
  """AdaLoRA: ``loss`` plus ``weight * adalora_orth_loss``, so the step's weighted mean gains ``orth_reg_weight * R``
  exactly once. Other variants: ``loss`` itself."""
  if lora_config.variant != "adalora":
    return loss

  def with_orth_regulariser(trainable, params, batch, rng):
    total, aux = loss(trainable, params, batch, rng)
    return total + aux["weight"] * jlora.adalora_orth_loss(trainable["lora"], lora_config), aux

  return with_orth_regulariser


def allocator_state(opt_state: Any) -> jlora.AdaLoraAllocatorState:
  """The AdaLoRA allocator's state inside the job's optimizer state."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, jlora.AdaLoraAllocatorState))
           if isinstance(x, jlora.AdaLoraAllocatorState)]
  if len(found) != 1:
    raise ValueError(f"expected one AdaLoRA allocator state in the optimizer state, found {len(found)}")
  return found[0]


def exported(lora: jlora.Lora, trainable: dict, opt_state: Any, *, initial: Mapping | None, original: Mapping,
             trained_on: Mapping) -> tuple[dict, jlora.LoraConfig, Mapping]:
  """``(adapters, config, base)``: the adapter the job exports, its config, and the params it applies to.

  Args:
    lora: the job's Lora.
    trainable: the trained ``{"lora": adapters, ...}``.
    opt_state: the optimizer state (AdaLoRA's allocation is in it).
    initial: the adapters as ``init_with_base`` made them (PiSSA/OLoRA), else None.
    original: the base as loaded.
    trained_on: the base the adapters trained on (the residual, or the base plus VeRA's projections).
  """
  adapters, config = trainable["lora"], lora.config
  if config.rewrites_base:
    adapters, config = lora.to_plain_lora(adapters, initial)
    return adapters, config, original
  if config.variant == "adalora":
    masks = allocator_state(opt_state).masks  # keyed by node paths in the trainable tree: "lora/<kernel path>"
    masks = {path.removeprefix("lora/"): mask for path, mask in masks.items()}
    adapters, config = jlora.adalora_resize(adapters, masks, config)
  return adapters, config, trained_on
