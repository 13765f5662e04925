"""Activated LoRA (Greenewald et al., 2025): LoRA that acts only from its invocation sequence on.

    y[b, t] = base(x)[b, t] + [t >= first_b] * s * (dropout(x[b, t]) @ A) @ B

``first_b`` is where the last occurrence of ``LoraConfig.invocation_tokens`` starts in row ``b`` (no
adapter at all in a row without it), as PEFT's ``ALoraLinearVariant`` computes it from
``alora_invocation_tokens``. The adapter's leaves, init and update norms are LoRA's. The activation is a
per-call input, computed by ``jlora.Lora`` from the call's token ids (``jlora._alora``) and handed to each
module as ``Call.state["first"]``; a call without it is refused, never silently adapted everywhere.

Like PEFT's, aLoRA adapts linear maps only (``Dense``, ``DenseGeneral``, ``Einsum``, whose outputs lead
with ``(batch, tokens)``), with random init (the base it leaves untouched before the invocation must be the
model's own, so PiSSA/OLoRA's residual base is refused), and cannot be merged: a merged kernel would adapt
every token.
"""

import jax

from jlora._alora import token_mask
from jlora._config import is_base_rewriting
from jlora._errors import JloraError
from jlora._targets import Target
from jlora._variant import Adapter, Call, LeafAxes, Variant
from jlora.variants import _lora

KINDS = ("dense", "dense_general", "einsum")  # PEFT's aLoRA: Linear layers only


def check_config(config) -> None:
  if config.use_dora:
    raise JloraError("LoraConfig(invocation_tokens=..., use_dora=True): activated LoRA is a plain LoRA that acts from "
                     "its invocation on; PEFT has no activated DoRA either.")
  if is_base_rewriting(config.init):
    raise JloraError(f"LoraConfig(invocation_tokens=..., init={config.init!r}): PiSSA/OLoRA rewrite the base into a "
                     "residual, so the tokens before the invocation would not be the base model's (their KV cache "
                     "would not be reusable). Use a random init.")


def check_kind(target: Target) -> None:
  if target.kind not in KINDS:
    raise JloraError(f"Activated LoRA cannot adapt '{target.path}', a {target.module_type} ({target.kind}) kernel: "
                     "like PEFT's aLoRA (Linear layers only) it adapts Dense, DenseGeneral and Einsum kernels. "
                     "Exclude it from LoraConfig.targets.")


def leaves(target: Target) -> LeafAxes:
  check_kind(target)
  return _lora.leaves(target)


def _init(key: jax.Array, target: Target, config, kernel: jax.Array) -> tuple[dict, jax.Array]:
  check_kind(target)
  check_config(config)
  return _lora.init_factors(key, target, config, kernel)


def _apply(adapter: Adapter, call: Call) -> jax.Array:
  path = call.target.path
  if not isinstance(call.state, dict) or "first" not in call.state:
    raise JloraError(f"The activated LoRA adapter of '{path}' was called without its activation (where each row's "
                     "invocation starts): apply it with jlora.Lora.apply / apply_fn, which compute it from the "
                     "model's token ids, or load it into a jlora.AdapterBank.")
  base_out = call.base()
  update = call.low_rank(adapter["lora_a"], call.target.scale * adapter["lora_b"])
  mask = token_mask(call.state["first"], update, f"'{path}'")
  return base_out + (update * mask.astype(update.dtype)).astype(base_out.dtype)


def _refuse_merge(*args, **kwargs):
  raise JloraError("An activated LoRA adapter acts only from its invocation on, so it has no merged kernel (a merged "
                   "kernel would adapt every token, PEFT refuses too); apply it unmerged.")


ALORA = Variant(
    name="alora",
    leaf_names=_lora.LEAVES,
    leaves=leaves,
    init=_init,
    apply=_apply,
    merge=_refuse_merge,
    unmerge=_refuse_merge,
    update_norms=_lora.LORA.update_norms,
)
