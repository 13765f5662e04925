"""DoRA (Liu et al., 2024): LoRA's direction with a trained magnitude per output feature.

    y = (m / ||W + s·A@B||) ⊙ (W + s·A@B) x + bias,      the norm per output feature, detached

as PEFT computes it (``peft.tuners.lora.dora``): with ``g = m / ||W + s·A@B||`` (no gradient through the
norm), ``y = base(x) + (g - 1) ⊙ (W x) + g ⊙ s·(x @ A) @ B``. While adapter dropout is active, PEFT feeds
the dropped input to both extra terms, recomputing the frozen product ``W·dropout(x)``; so does jlora, with
the same mask. ``m`` (``lora_magnitude``: the kernel's batch + output axes) starts at ``||W + s·A@B||``,
so an initialised adapter is the identity whatever ``A`` and ``B`` start at (PiSSA/OLoRA included).

Cost: ``W + s·A@B`` is never formed in training. Per output feature,
``||W + s·A@B||² = ||W||² + 2 s <W, A@B> + s² ||A@B||²``: one pass over ``W`` for ``||W||²``, the cross term
from the ``W^T A`` product (``fan_out x r``), the last from the ``r x r`` Gram of ``A`` and ``B``. All of it
is detached, so the backward pass adds nothing kernel-sized.

On ``nn.Embed.attend`` (a tied output projection: ``q @ E'^T``) the magnitude scales ``E'``'s columns, that
is the query's features: ``y = base(g ⊙ q) + s·((g ⊙ q) @ B^T) @ A^T``, so a merged table serves both uses.

Merging gives ``W' = g ⊙ (W + s·A@B)`` (float32, cast once). ``W'`` alone does not determine ``W`` (any
column norm is consistent with it), so unmerging needs the norms used at merge time: ``merge`` returns them
as its memo (``jlora.nnx.merge`` keeps them on the module, as PEFT caches them) and ``Lora.unmerge``, which
has no memo, refuses.
"""

import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora._targets import Target
from jlora._variant import Adapter, Call, LeafAxes, Variant
from jlora.variants._kernel_math import column_norms, column_stats, to_native
from jlora.variants._lora import delta, init_factors
from jlora.variants._lora import leaves as lora_leaves

LEAVES = ("lora_a", "lora_b", "lora_magnitude")
_TINY = 1e-30  # keeps a zero column's norm from dividing by zero; m is 0 there too


def leaves(target: Target) -> LeafAxes:
  layout = target.layout
  return {**lora_leaves(target), "lora_magnitude": layout.batch_axes + layout.out_axes}


def norms(kernel: jax.Array, adapter: Adapter, target: Target) -> jax.Array:
  """``||W + s·A@B||`` per output feature (``stack + batch + out``) without forming ``W + s·A@B``. Float32."""
  w2, cross, quad = column_stats(kernel, adapter["lora_a"], adapter["lora_b"], target.layout)
  s = target.scale
  return jnp.sqrt(jnp.maximum(w2 + 2.0 * s * cross + s * s * quad, _TINY))


def _init(key: jax.Array, target: Target, config, kernel: jax.Array) -> tuple[dict, jax.Array]:
  adapter, kernel = init_factors(key, target, config, kernel)
  magnitude = norms(kernel, adapter, target)
  return {**adapter, "lora_magnitude": magnitude.astype(config.dtype)}, kernel


def _apply(adapter: Adapter, call: Call) -> jax.Array:
  target = call.target
  norm = jax.lax.stop_gradient(norms(call.kernel(), adapter, target))
  g = adapter["lora_magnitude"].astype(jnp.float32) / norm
  n_batch = len(target.layout.batch_axes)
  g_b = jnp.expand_dims(g, n_batch)  # batch + (1,) + out: scales B's output axes
  low_rank = call.low_rank(adapter["lora_a"], target.scale * g_b * adapter["lora_b"].astype(jnp.float32))
  if call.transposed:
    # nn.Embed.attend: g scales the query's features (the table's columns), bias-free.
    def scaled(factor):
      return lambda q: q * factor.astype(q.dtype).reshape((1,) * (q.ndim - factor.ndim) + factor.shape)

    if not call.training:
      out = call.base(scaled(g))
      return out + low_rank.astype(out.dtype)
    out = call.base()
    extra = call.base(lambda q: scaled(g - 1.0)(call.dropout(q)))
    return out + (extra + low_rank).astype(out.dtype)
  bias = call.bias()
  out = call.base()
  g_out = call.features(g)
  frozen = (out if not call.training else call.base(call.dropout)) - bias  # W x, or W dropout(x) as PEFT
  return out + ((g_out - 1.0) * frozen + low_rank).astype(out.dtype)


def _merge(kernel: jax.Array, adapter: Adapter, target: Target, state=None):
  combined = kernel.astype(jnp.float32) + target.scale * delta(adapter, target)
  norm = column_norms(combined, target.layout)
  g = adapter["lora_magnitude"].astype(jnp.float32) / jnp.maximum(norm, jnp.sqrt(_TINY))
  return (to_native(g, target.layout) * combined).astype(kernel.dtype), norm


def _unmerge(kernel: jax.Array, adapter: Adapter, target: Target, state=None, memo=None) -> jax.Array:
  if memo is None:
    raise JloraError(f"Cannot unmerge the DoRA adapter of '{target.path}' from the merged kernel alone: "
                     "W' = (m / ||W + s·A@B||) ⊙ (W + s·A@B) is consistent with any column norm, so W is not "
                     "recoverable. Merging is functional (the params you merged are unchanged): keep them, or use "
                     "jlora.nnx.merge/unmerge, which keep the norms.")
  g = adapter["lora_magnitude"].astype(jnp.float32) / jnp.maximum(memo, jnp.sqrt(_TINY))
  combined = kernel.astype(jnp.float32) / to_native(g, target.layout)
  return (combined - target.scale * delta(adapter, target)).astype(kernel.dtype)


def _update_norms(kernel: jax.Array, adapter: Adapter, target: Target, state=None) -> jax.Array:
  """``||W' - W||`` per stacked layer: per feature ``(g-1)² ||W||² + 2 (g-1) g s <W, A@B> + g² s² ||A@B||²``."""
  w2, cross, quad = column_stats(kernel, adapter["lora_a"], adapter["lora_b"], target.layout)
  s = target.scale
  norm = jnp.sqrt(jnp.maximum(w2 + 2.0 * s * cross + s * s * quad, _TINY))
  g = adapter["lora_magnitude"].astype(jnp.float32) / norm
  squared = (g - 1.0) ** 2 * w2 + 2.0 * (g - 1.0) * g * s * cross + (g * s) ** 2 * quad
  squared = squared.reshape(target.stack_shape + (-1,)).sum(-1)
  return jnp.sqrt(jnp.maximum(squared, 0.0))


DORA = Variant(
    name="dora",
    leaf_names=LEAVES,
    leaves=leaves,
    init=_init,
    apply=_apply,
    merge=_merge,
    unmerge=_unmerge,
    update_norms=_update_norms,
    vector_leaves=("lora_magnitude",),
    reads_kernel=True,
)
