"""The nnx Variable types jlora adds: trainable adapter leaves, merge memos, shared variant state."""

from flax import nnx


class LoraParam(nnx.Variable):
  """A trainable adapter leaf (``lora_a``, ``lora_b``, DoRA's ``lora_magnitude``, ...) added by ``jlora.nnx.apply_lora``.

  Deliberately *not* a subclass of ``nnx.Param``: ``nnx.state(model, nnx.Param)`` stays the frozen
  base model, ``nnx.state(model, LoraParam)`` is the trainable tree, and
  ``nnx.Optimizer(model, tx, wrt=LoraParam)`` keeps optimizer state for the adapters only.
  """


class LoraMemo(nnx.Variable):
  """What a merged adapter's ``unmerge`` needs beyond the adapter (DoRA: the column norms at merge time).

  Set by ``jlora.nnx.merge`` and consumed by ``jlora.nnx.unmerge``; not trainable, not part of the base.
  """


class LoraState(nnx.Variable):
  """A variant's shared frozen state (e.g. VeRA's projections): one variable, held by every adapted module.

  Not trainable (``wrt=LoraParam`` leaves it alone) and not an ``nnx.Param`` (the base state is unchanged).
  """
