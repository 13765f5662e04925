"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, ``P Λ Q``, whose triplets a budget prunes during training.

    y = base(x) + s * ((dropout(x) @ (A ⊙ E)) @ B),      s = alpha / (init_rank + 1e-5)

as PEFT computes it (``peft.tuners.adalora``: ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` the initial
rank, kept after pruning). Trainable leaves: ``lora_a`` (the right singular vectors, ``batch + in + (r,)``),
``lora_e`` (the singular values, ``batch + (r,)``, starting at 0: the identity) and ``lora_b`` (the left ones,
``batch + (r,) + out``); ``A`` and ``B`` start at ``N(0, 0.02)``. The rank allocator
(``jlora.adalora_allocator``) zeroes the ``E`` entries of the least important triplets, and
``jlora.adalora_resize`` slices the adapter to the ranks it allocated (``rank_pattern``); the orthogonal
regulariser is ``jlora.adalora_orth_loss``.

Like PEFT's (``SVDLinear``, ``SVDConv2d``), AdaLoRA adapts ``Dense``, ``DenseGeneral``, ``Einsum`` and
``Conv`` kernels; ``Embed`` is refused.
"""

import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora._targets import Target
from jlora._variant import Adapter, Call, LeafAxes, Variant
from jlora.variants._lora import factor_norms

LEAVES = ("lora_a", "lora_e", "lora_b")
REFUSED = ("embed",)  # binding kinds PEFT has no AdaLoRA for
INIT_STD = 0.02  # PEFT's reset_lora_parameters: A, B ~ N(0, 0.02), E = 0


def check_kind(target: Target) -> None:
  if target.kind in REFUSED:
    raise JloraError(f"AdaLoRA cannot adapt '{target.path}', a {target.module_type} ({target.kind}) kernel: like "
                     "PEFT's AdaLoRA (Linear, Conv1D, Conv2d), jlora's adapts linear maps and convolutions, no "
                     "embeddings. Exclude it from LoraConfig.targets.")


def leaves(target: Target) -> LeafAxes:
  check_kind(target)
  layout = target.layout
  return {"lora_a": layout.batch_axes + layout.in_axes + (None,), "lora_e": layout.batch_axes + (None,),
          "lora_b": layout.batch_axes + (None,) + layout.out_axes}


def _init(key: jax.Array, target: Target, config, kernel: jax.Array) -> tuple[dict, jax.Array]:
  check_kind(target)
  layout, rank, stack = target.layout, target.rank, target.stack_shape
  key_a, key_b = jax.random.split(key)
  batch = tuple(layout.shape[i] for i in layout.batch_axes)
  return {"lora_a": INIT_STD * jax.random.normal(key_a, stack + layout.a_shape(rank), config.dtype),
          "lora_e": jnp.zeros(stack + batch + (rank,), config.dtype),
          "lora_b": INIT_STD * jax.random.normal(key_b, stack + layout.b_shape(rank), config.dtype)}, kernel


def scaled_a(adapter: Adapter, target: Target) -> jax.Array:
  """``A ⊙ E``: each right singular vector times its singular value (``lead + in + (r,)``)."""
  lora_a, lora_e = adapter["lora_a"], adapter["lora_e"]
  n_in = len(target.layout.in_axes)
  return lora_a * lora_e.reshape(lora_e.shape[:-1] + (1,) * n_in + lora_e.shape[-1:])


def _apply(adapter: Adapter, call: Call) -> jax.Array:
  target = call.target
  base_out = call.base()
  update = call.low_rank(scaled_a(adapter, target), target.scale * adapter["lora_b"])
  return base_out + update.astype(base_out.dtype)


def delta(adapter: Adapter, target: Target) -> jax.Array:
  """``(A ⊙ E) @ B`` in float32, laid out like the kernel (stack axes kept)."""
  return target.layout.delta(scaled_a(adapter, target).astype(jnp.float32), adapter["lora_b"].astype(jnp.float32))


def _merge(kernel: jax.Array, adapter: Adapter, target: Target, state=None):
  return (kernel.astype(jnp.float32) + target.scale * delta(adapter, target)).astype(kernel.dtype), None


def _unmerge(kernel: jax.Array, adapter: Adapter, target: Target, state=None, memo=None) -> jax.Array:
  return (kernel.astype(jnp.float32) - target.scale * delta(adapter, target)).astype(kernel.dtype)


def _update_norms(kernel: jax.Array, adapter: Adapter, target: Target, state=None) -> jax.Array:
  return abs(target.scale) * factor_norms(scaled_a(adapter, target), adapter["lora_b"], target)


ADALORA = Variant(
    name="adalora",
    leaf_names=LEAVES,
    leaves=leaves,
    init=_init,
    apply=_apply,
    merge=_merge,
    unmerge=_unmerge,
    update_norms=_update_norms,
)
