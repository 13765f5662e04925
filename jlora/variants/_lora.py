"""LoRA (Hu et al., 2021): ``y = base(x) + s * (dropout(x) @ A) @ B``, ``s = alpha / r`` (or ``alpha / sqrt(r)``).

``A`` starts per ``LoraConfig.init``: random with ``B = 0`` (``"kaiming_uniform"``, ``"gaussian"``), or
from the kernel itself (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``), which also returns the residual
base ``W - s·A@B`` (see ``jlora.variants._init``).
"""

import jax
import jax.numpy as jnp

from jlora._targets import Target
from jlora._variant import Adapter, Call, LeafAxes, Variant
from jlora.variants._init import is_base_rewriting, kernel_factors, random_factors

LEAVES = ("lora_a", "lora_b")


def leaves(target: Target) -> LeafAxes:
  layout = target.layout
  return {"lora_a": layout.batch_axes + layout.in_axes + (None,),
          "lora_b": layout.batch_axes + (None,) + layout.out_axes}


def init_factors(key: jax.Array, target: Target, config, kernel: jax.Array) -> tuple[dict, jax.Array]:
  """``({"lora_a", "lora_b"}, kernel')`` per ``config.init``; ``kernel'`` is the residual for PiSSA/OLoRA."""
  if is_base_rewriting(config.init):
    lora_a, lora_b, residual = kernel_factors(key, target, config.init, kernel, config.dtype)
    return {"lora_a": lora_a, "lora_b": lora_b}, residual
  lora_a, lora_b = random_factors(key, target, config.init, config.dtype)
  return {"lora_a": lora_a, "lora_b": lora_b}, kernel


def _apply(adapter: Adapter, call: Call) -> jax.Array:
  base_out = call.base()
  # Scaling the (r, out) factor rather than the (tokens, out) update saves an elementwise pass over
  # the activations, forward and backward.
  update = call.low_rank(adapter["lora_a"], call.target.scale * adapter["lora_b"])
  return base_out + update.astype(base_out.dtype)


def delta(adapter: Adapter, target: Target) -> jax.Array:
  """``A @ B`` in float32, laid out like the kernel (stack axes kept)."""
  return target.layout.delta(adapter["lora_a"].astype(jnp.float32), adapter["lora_b"].astype(jnp.float32))


def _merge(kernel: jax.Array, adapter: Adapter, target: Target, state=None):
  merged = kernel.astype(jnp.float32) + target.scale * delta(adapter, target)
  return merged.astype(kernel.dtype), None


def _unmerge(kernel: jax.Array, adapter: Adapter, target: Target, state=None, memo=None) -> jax.Array:
  return (kernel.astype(jnp.float32) - target.scale * delta(adapter, target)).astype(kernel.dtype)


def factor_norms(lora_a: jax.Array, lora_b: jax.Array, target: Target) -> jax.Array:
  """``||A @ B||_F`` per stacked layer, from the ``r x r`` Gram matrices (``A @ B`` is never formed)."""
  n_stack, n_batch = len(target.stack_shape), len(target.layout.batch_axes)
  a = jnp.asarray(lora_a, jnp.float32).reshape(lora_a.shape[:n_stack + n_batch] + (-1, lora_a.shape[-1]))
  b = jnp.asarray(lora_b, jnp.float32)
  b = b.reshape(b.shape[:n_stack + n_batch + 1] + (-1,))
  gram_a = jnp.einsum("...ir,...iq->...rq", a, a, precision=jax.lax.Precision.HIGHEST)
  gram_b = jnp.einsum("...ro,...qo->...rq", b, b, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(gram_a * gram_b, axis=(-2, -1))
  squared = squared.reshape(target.stack_shape + (-1,)).sum(-1)
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _update_norms(kernel: jax.Array, adapter: Adapter, target: Target, state=None) -> jax.Array:
  return abs(target.scale) * factor_norms(adapter["lora_a"], adapter["lora_b"], target)


LORA = Variant(
    name="lora",
    leaf_names=LEAVES,
    leaves=leaves,
    init=init_factors,
    apply=_apply,
    merge=_merge,
    unmerge=_unmerge,
    update_norms=_update_norms,
)
