"""jlora.nnx: LoRA for unmodified ``flax.nnx`` models, by model surgery.

The same ``jlora.LoraConfig``, maths (``jlora.KernelLayout``, the config's ``jlora.Variant``) and adapter
layout as ``jlora.Lora`` for linen: targeted ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
``nnx.Conv`` and ``nnx.Embed`` modules gain ``lora_a`` / ``lora_b`` factors (and the variant's other
leaves, e.g. DoRA's ``lora_magnitude``) of type ``LoraParam``.

Public API:

* ``apply_lora(model, config, *, rngs)``: adds adapters in place; returns the adapted kernel paths.
* ``LoraParam``: the adapters' Variable type (not an ``nnx.Param``): ``nnx.state(model, LoraParam)``
  is the trainable tree, ``nnx.Optimizer(model, tx, wrt=LoraParam)`` trains only it.
* ``LoraState``: a variant's shared frozen state (one variable held by every adapted module);
  ``LoraMemo``: what a merged adapter's unmerge needs (DoRA's column norms). Neither is trained.
* ``merge(model)`` / ``unmerge(model)``: fold the adapters into the kernels and back, in place.
* ``merged_copy(model)``: a plain nnx model (original classes, no adapters) with the adapters folded in.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jlora, jlora.nnx
  >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  >>> jlora.nnx.apply_lora(model, jlora.LoraConfig(targets="kernel", rank=2), rngs=nnx.Rngs(1))
  ['kernel']
  >>> model.lora_b[...] = jnp.ones((2, 3))
  >>> plain = jlora.nnx.merged_copy(model)
  >>> type(plain).__name__, bool(jnp.allclose(plain(jnp.ones((1, 4))), model(jnp.ones((1, 4)))))
  ('Linear', True)
"""

from jlora.nnx._param import LoraMemo, LoraParam, LoraState
from jlora.nnx._surgery import apply_lora, merge, merged_copy, unmerge

__all__ = [
    "LoraMemo",
    "LoraParam",
    "LoraState",
    "apply_lora",
    "merge",
    "merged_copy",
    "unmerge",
]
