"""Adapter variants: a variant is an init, an apply and a merge (plus its inverse).

The module bindings know *where* an adapter acts (which axes, which convolution, which lookup); a
variant knows *what* it computes there. A new variant (DoRA's magnitude, VeRA's vectors, AdaLoRA's
SVD triplet) adds keys to the per-kernel adapter dict and supplies these four functions; the
bindings and the ``Lora`` plumbing stay unchanged.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jlora._layout import KernelLayout

# (a, b) -> the module's adapter path (dropout(x) @ a) @ b, in the module's own conventions.
LowRank = Callable[[jax.Array, jax.Array], jax.Array]
Adapter = Mapping[str, jax.Array]


class Variant(NamedTuple):
  """Pure functions that define one adapter flavour.

  Attributes:
    name: the variant's name.
    leaf_names: the keys of the per-kernel adapter dict; the trainable leaves.
    init: ``(key, target, config) -> adapter dict``, leaves shaped ``stack + ...``.
    apply: ``(adapter, base_out, low_rank, scale) -> y``, per call of the adapted module.
    merge: ``(kernel, adapter, layout, scale) -> kernel'`` with the adapter folded in.
    unmerge: ``(kernel', adapter, layout, scale) -> kernel``, the inverse of ``merge``.
  """

  name: str
  leaf_names: tuple[str, ...]
  init: Callable
  apply: Callable[[Adapter, jax.Array, LowRank, float], jax.Array]
  merge: Callable[[jax.Array, Adapter, KernelLayout, float], jax.Array]
  unmerge: Callable[[jax.Array, Adapter, KernelLayout, float], jax.Array]


def _lora_init(key: jax.Array, target, config) -> dict[str, jax.Array]:
  layout, rank, dtype = target.layout, target.rank, config.dtype
  a_shape = target.stack_shape + layout.a_shape(rank)
  b_shape = target.stack_shape + layout.b_shape(rank)
  if target.kind == "embed":
    # The input is a one-hot row, so fan-in scaling would make A vanish; PEFT draws its embedding
    # factor from N(0, 1) for the same reason.
    lora_a = jax.random.normal(key, a_shape, dtype)
  elif config.init == "gaussian":
    lora_a = jax.random.normal(key, a_shape, dtype) / rank
  else:
    # torch's kaiming_uniform_(a=sqrt(5)) as PEFT uses it: bound = sqrt(6 / ((1 + 5) * fan_in)).
    bound = 1.0 / jnp.sqrt(float(layout.fan_in))
    lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
  return {"lora_a": lora_a, "lora_b": jnp.zeros(b_shape, dtype)}


def _lora_apply(adapter: Adapter, base_out: jax.Array, low_rank: LowRank, scale: float) -> jax.Array:
  # Scaling the (r, out) factor rather than the (tokens, out) update saves an elementwise pass over
  # the activations, forward and backward.
  update = low_rank(adapter["lora_a"], scale * adapter["lora_b"])
  return base_out + update.astype(base_out.dtype)


def _lora_merge(kernel: jax.Array, adapter: Adapter, layout: KernelLayout, scale: float) -> jax.Array:
  delta = layout.delta(adapter["lora_a"].astype(jnp.float32), adapter["lora_b"].astype(jnp.float32))
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def _lora_unmerge(kernel: jax.Array, adapter: Adapter, layout: KernelLayout, scale: float) -> jax.Array:
  return _lora_merge(kernel, adapter, layout, -scale)


LORA = Variant(
    name="lora",
    leaf_names=("lora_a", "lora_b"),
    init=_lora_init,
    apply=_lora_apply,
    merge=_lora_merge,
    unmerge=_lora_unmerge,
)
