"""Applying an adapter bank: every row of a batch with its own slot's adapter (or none), inside the model's own modules.

``AdapterBank.inject`` places each kernel's stacked slot factors beside the kernel in the params tree (under
``BANK_PREFIX + name``, so ``nn.scan``/``nn.remat`` slice them like the kernel) and the per-slot invocation
sequences under the root key ``BANK_KEY``. ``run_bank`` then calls the unmodified model with an interceptor
that, in every adapted module, adds

    y[b] += coef_b * mask_b(t) * (dropout_b(x[b]) @ A_{s_b}) @ B_{s_b},      coef_b = scale_{s_b} (0 when s_b = -1)

with ``s_b`` the row's slot, ``mask_b`` its activated-LoRA token mask (all tokens for a plain adapter) and
the factors gathered per row (``jlora._bank_kernels``). Nothing is compiled per slot or per adapter: slot
ids, factors and invocation sequences are ordinary arrays.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._alora import first_adapted, model_token_ids, split_cache, starts_per_row, token_mask, with_cache_record
from jlora._bank_kernels import bgmv_einsum, choose, embed_lookup_rows, generic_rows, row_letter, sgmv_dense
from jlora._errors import JloraError
from jlora._linen_bindings import _equation, binding_for
from jlora._linen_call import get_input, input_name, with_input
from jlora.quant._call import module_call

BANK_PREFIX = "jlora-bank:"  # beside an adapted kernel: {"lora_a", "lora_b", "scale"} of every slot
BANK_KEY = "jlora:bank"  # params root: {"invocation", "invocation_length", "dropout"} per slot
_EINSUM_KINDS = ("dense", "dense_general", "einsum")


@dataclasses.dataclass(frozen=True)
class Rows:
  """What every adapted module of one bank call needs about the batch's rows.

  Attributes:
    slot_b: int32 ``(B,)``: each row's slot, clipped into range (rows without adapter use slot 0, coef 0).
    valid_b: bool ``(B,)``: the row has an adapter.
    first_b: int32 ``(B,)``: first adapted token of each row in this call (activated LoRA), or None when the
      bank has no invocation sequences (every token adapted).
    rate_b: float32 ``(B,)``: the row's adapter dropout rate.
    lora_dropout: as in ``jlora.Lora.apply``.
    kernel: "bgmv", "sgmv" or None (the measured choice per phase).
  """

  slot_b: jax.Array
  valid_b: jax.Array
  first_b: jax.Array | None
  rate_b: jax.Array
  lora_dropout: bool | None
  kernel: str | None


def row_ids(adapter_ids: Any, batch: int, n_slots: int) -> jax.Array:
  """``adapter_ids`` as int32 ``(batch,)``, checked (values too, when concrete)."""
  ids = jnp.asarray(adapter_ids)
  if ids.shape != (batch,) or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise JloraError(f"adapter_ids must be ints of shape ({batch},) (one slot per row, -1 for the base model), got "
                     f"{ids.dtype} {tuple(ids.shape)}.")
  if not isinstance(ids, jax.core.Tracer):
    bad = [int(i) for i in jax.device_get(ids).tolist() if not -1 <= i < n_slots]
    if bad:
      raise JloraError(f"adapter_ids {bad} are outside the bank's slots 0..{n_slots - 1} (-1: the base model).")
  return ids.astype(jnp.int32)


def run_bank(model: nn.Module, variables: Mapping, args: tuple, kwargs: Mapping, adapter_ids: Any, *,
             lora_dropout: bool | None, kernel: str | None) -> Any:
  """``model.apply(variables, *args, **kwargs)`` with each row adapted by its slot of the injected bank."""
  params = variables["params"]
  if BANK_KEY not in params:
    raise JloraError("These params carry no adapter bank: pass params=bank.inject(params, state).")
  shared = params[BANK_KEY]
  model_params = {k: v for k, v in params.items() if k != BANK_KEY}
  n_slots, width = shared["invocation"].shape
  batch = _batch_size(args, kwargs)
  ids_b = row_ids(adapter_ids, batch, n_slots)
  valid_b = ids_b >= 0
  slot_b = jnp.clip(ids_b, 0, n_slots - 1)
  variables, seen, cached = split_cache({**variables, "params": model_params})
  first_b = None
  if width:
    token_ids = model_token_ids(args, kwargs)
    lengths_b = jnp.where(valid_b, shared["invocation_length"][slot_b], 0)
    starts_b = starts_per_row(token_ids, shared["invocation"][slot_b], lengths_b)
    first_alora, seen = first_adapted(starts_b, token_ids.shape[1], seen, ids_b)
    first_b = jnp.where(lengths_b > 0, first_alora, 0)
  rate_b = jnp.where(valid_b, shared["dropout"][slot_b], 0.0)
  rows = Rows(slot_b, valid_b, first_b, rate_b, lora_dropout, kernel)
  with nn.intercept_methods(functools.partial(_interceptor, rows)):
    out = model.apply(variables, *args, **kwargs)
  return with_cache_record(out, kwargs, seen) if cached and width else out


def _batch_size(args: tuple, kwargs: Mapping) -> int:
  first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
  if first is None or not getattr(first, "shape", ()):
    raise JloraError("A bank call needs the model's first input (positional, or input_ids=) to lead with the batch "
                     "axis, one row per adapter id.")
  return first.shape[0]


def _dropped(module: nn.Module, rows: Rows, x: jax.Array, path: str) -> jax.Array:
  if rows.lora_dropout is False or not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if not module.has_rng("dropout"):
    if rows.lora_dropout:
      raise JloraError(f"lora_dropout=True but no 'dropout' rng reached '{path}': pass rngs={{'dropout': key}}.")
    return x
  rate = rows.rate_b.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  keep = jax.random.uniform(module.make_rng("dropout"), x.shape) >= rate
  return jnp.where(keep, x / (1 - rate), jnp.zeros((), x.dtype))


def _interceptor(rows: Rows, next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  binding = binding_for(module)
  base = module_call(module, method, binding, next_fun)
  if binding is None or method not in binding.methods or not module.has_variable("params", BANK_PREFIX + binding.param):
    return base(*args, **kwargs)
  node = module.get_variable("params", BANK_PREFIX + binding.param)
  y = base(*args, **kwargs)
  path = "/".join(module.path + (binding.param,))
  where = f"{type(module).__name__} at '{path}'"
  name = input_name(method)
  x = get_input(args, kwargs, name)
  if x.shape[0] != rows.slot_b.shape[0]:
    raise JloraError(f"{where} gets an input of shape {tuple(x.shape)}; the bank needs every adapted module's input "
                     f"to lead with the batch's {rows.slot_b.shape[0]} rows (one adapter per row).")
  kernel = module.get_variable("params", binding.param)
  layout = binding.layout(module, method, args, kwargs, kernel.shape)
  dtype = y.dtype
  coef_b = jnp.where(rows.valid_b, node["scale"][rows.slot_b], 0.0)
  x = _dropped(module, rows, x, path)

  def b_rows():
    b = node["lora_b"][rows.slot_b]
    return (b * coef_b.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype)).astype(dtype)

  if binding.kind in _EINSUM_KINDS:
    equation = _equation(module, method, args, kwargs, layout.shape)
    row_letter(equation, where)
    x = jnp.asarray(x, dtype)
    per_row = x.size // x.shape[0] // max(layout.fan_in, 1)
    if binding.kind == "dense" and choose(rows.kernel, per_row) == "sgmv":
      update = sgmv_dense(x, node["lora_a"], node["lora_b"], rows.slot_b, coef_b, module.precision)
    else:
      update = bgmv_einsum(equation, layout, x, node["lora_a"][rows.slot_b].astype(dtype), b_rows(), module.precision)
  elif binding.kind == "embed" and method == "__call__":
    update = embed_lookup_rows(x, node["lora_a"], b_rows(), rows.slot_b, dtype)
  else:
    def low_rank(x1, a1, b1):
      one_args, one_kwargs = with_input(args, kwargs, name, x1)
      return binding.low_rank(module, method, one_args, one_kwargs, layout, a1, b1, lambda v: v, dtype)

    update = generic_rows(low_rank, x, node["lora_a"][rows.slot_b], b_rows())
  if rows.first_b is not None:
    update = update * token_mask(rows.first_b, update, where).astype(update.dtype)
  return y + update.astype(y.dtype)
