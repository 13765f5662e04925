"""The variant interface: what one adapter flavour (LoRA, DoRA, VeRA, AdaLoRA, ...) supplies.

The module bindings know *where* an adapter acts (which axes, which convolution, which lookup); a
variant knows *what* it computes there. A variant is a value, a record of pure functions, selected
by ``LoraConfig`` (``jlora.variants.variant_for``), so the config alone rebuilds an adapter; the
bindings and the ``Lora`` / ``jlora.nnx`` plumbing never learn about particular variants.

Trainable and frozen state
--------------------------
* **Trainable**: the adapter tree. Per adapted kernel, a dict of the variant's ``leaf_names``
  (``{"lora_a", "lora_b"}`` for LoRA, plus ``"lora_magnitude"`` for DoRA); nothing else. optax
  routing (``jlora.adapters_only``, ``jlora.lora_plus``) and sharding (``Variant.leaves``) see only
  these leaves.
* **Frozen**: the params tree (the base), never mutated. A variant changes the frozen side in exactly
  two ways, both returned by ``Lora.init_with_base`` as a new params tree (the caller's is untouched):

  1. its ``init`` returns the kernel the adapter pairs with, which replaces the base kernel when it
     differs (PiSSA/OLoRA's residual ``W - s·B·A``; every other variant returns the kernel unchanged);
  2. its ``init_state`` returns *shared* frozen state (e.g. VeRA's random projections, one copy for
     all kernels), stored in the params tree under the root key ``STATE_KEY`` (``"jlora:state"``) as
     ``{variant name: state}``. ``Lora`` strips that key before the model sees its params and hands
     the state to every ``apply``/``merge`` of the variant (``Call.state``); an nnx model holds it in
     one ``jlora.nnx.LoraState`` variable shared by every adapted module.

  Anything else a variant needs per call is *derived* inside the call from the kernel (DoRA's
  ``||W||²`` is recomputed, one pass over the kernel, cheaper than carrying a cache that a merge or a
  restart would have to invalidate).

Shapes and sharding
-------------------
``Variant.leaves(target)`` gives each leaf's axes as the kernel axes they stand for: an int is an
index into the kernel's own shape (``target.layout.shape``), ``None`` a rank-sized axis. Shapes are
``target.stack_shape + (layout.shape[i] if i is not None else rank ...)``, and a leaf is split
like the kernel axes it stands for (the rank axis is replicated); stacked-layer axes lead.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from jlora._targets import Target

Adapter = Mapping[str, jax.Array]
# Leaf name -> the kernel axis (index into layout.shape) each of its axes stands for; None: a rank axis.
LeafAxes = Mapping[str, tuple[int | None, ...]]

# The params-tree root key under which shared per-variant frozen state lives: ``{variant name: state}``.
STATE_KEY = "jlora:state"


class Call(NamedTuple):
  """One call of an adapted module, as its variant's ``apply`` sees it. Every function is evaluated lazily.

  Attributes:
    target: the adapted kernel as this call sees it (``layout``, ``kind``, ``rank``, ``scale``;
      ``stack_shape`` is ``()``: inside ``nn.scan`` the module sees one layer).
    method: the module method being called (``"__call__"``, ``"attend"``).
    transposed: the module applies the kernel transposed (``nn.Embed.attend``): its input has the
      kernel's output axes and its output the kernel's input axes.
    training: adapter dropout is active in this call (``dropout`` is not the identity). Never for integer
      inputs (token ids, which the lookup path does not drop).
    state: the variant's shared frozen state (see the module docstring), or None.
    base: ``base(transform=None) -> y``: the module's own output (bias included), computed on
      ``transform(x)`` when a transform of the input is given. ``base()`` is evaluated once per call.
    low_rank: ``low_rank(a, b) -> y``: the adapter path ``(dropout(x) @ a) @ b`` in the module's own
      conventions (``a: batch + in + (r,)``, ``b: batch + (r,) + out``), computed in the output dtype.
      Scaling ``b`` along its output axes scales the output's features the same way (for ``attend``:
      the input's).
    dropout: the adapter's input dropout (the identity when not ``training``); one mask per call, so
      ``base(dropout)`` sees the same dropped input as ``low_rank``.
    kernel: ``kernel() -> W``: the kernel the module computes with, as a float array (a quantized kernel
      dequantized).
    features: ``features(v) -> array``: ``v`` (shape ``batch + out`` of the kernel, in kernel order)
      broadcastable against the module's output (each output feature gets its ``v`` entry).
    bias: ``bias() -> array``: the module's bias as it is added to the output (broadcastable against
      it; ``0.0`` for a module without bias). Evaluating it with ``base()`` costs one product.
  """

  target: Target
  method: str
  transposed: bool
  training: bool
  state: Any
  base: Callable[..., jax.Array]
  low_rank: Callable[[jax.Array, jax.Array], jax.Array]
  dropout: Callable[[jax.Array], jax.Array]
  kernel: Callable[[], jax.Array]
  features: Callable[[jax.Array], jax.Array]
  bias: Callable[[], jax.Array]


class Variant(NamedTuple):
  """Pure functions that define one adapter flavour (see the module docstring for the frozen/trainable split).

  Attributes:
    name: the variant's name (``LoraConfig`` selects it).
    leaf_names: the keys of the per-kernel adapter dict: the trainable leaves.
    leaves: ``(target) -> LeafAxes``: each leaf's axes as the kernel axes they stand for (shapes, sharding).
    init: ``(key, target, config, kernel) -> (adapter, kernel')``: the adapter for ``kernel`` (float,
      shaped ``target.stack_shape + layout.shape``; abstract unless ``reads_kernel``) and the frozen kernel
      it pairs with (``kernel`` itself unless the variant rewrites the base, as PiSSA does).
    apply: ``(adapter, call: Call) -> y``: the adapted module's output.
    merge: ``(kernel, adapter, target, state) -> (kernel', memo)``: the kernel with the adapter folded in
      (float32 maths, cast once to the kernel's dtype), and what ``unmerge`` needs beyond the adapter
      (None when nothing).
    unmerge: ``(kernel', adapter, target, state, memo) -> kernel``: the inverse of ``merge``. ``memo`` is
      None when the caller kept nothing (``Lora.unmerge``); a variant whose merge cannot be inverted
      without it raises ``JloraError`` then.
    update_norms: ``(kernel, adapter, target, state) -> norms``: ``||merge(W) - W||_F`` per stacked layer
      (shape ``target.stack_shape``), computed without materialising the merged kernel where possible.
    vector_leaves: the leaves that are per-feature vectors (DoRA's magnitude), PEFT's one-dimensional
      parameters: LoRA+ trains them, like every ``lora_b``, at ``lr * ratio``.
    init_state: ``(key, targets, config) -> state``: shared frozen state (None: the variant has none).
    reads_kernel: ``init`` needs the kernel's values (DoRA's magnitude), not only its shape.
  """

  name: str
  leaf_names: tuple[str, ...]
  leaves: Callable[[Target], LeafAxes]
  init: Callable[..., tuple[dict, jax.Array]]
  apply: Callable[[Adapter, Call], jax.Array]
  merge: Callable[..., tuple[jax.Array, Any]]
  unmerge: Callable[..., jax.Array]
  update_norms: Callable[..., jax.Array]
  vector_leaves: tuple[str, ...] = ()
  init_state: Callable[..., Any] | None = None
  reads_kernel: bool = False


def leaf_shapes(variant: Variant, target: Target) -> dict[str, tuple[int, ...]]:
  """The shape of every adapter leaf of ``target`` (stacked-layer axes first)."""
  shape = target.layout.shape
  return {name: target.stack_shape + tuple(target.rank if i is None else shape[i] for i in axes)
          for name, axes in variant.leaves(target).items()}


def split_state(params: Mapping) -> tuple[Mapping, Mapping | None]:
  """``(params without the variants' shared frozen state, that state)`` (see the module docstring)."""
  if STATE_KEY not in params:
    return params, None
  return {k: v for k, v in params.items() if k != STATE_KEY}, params[STATE_KEY]
