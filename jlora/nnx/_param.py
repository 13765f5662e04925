"""LoraParam: the nnx Variable type of adapter factors."""

from flax import nnx


class LoraParam(nnx.Variable):
  """A trainable LoRA adapter factor (``lora_a`` or ``lora_b``) added by ``jlora.nnx.apply_lora``.

  Deliberately *not* a subclass of ``nnx.Param``: ``nnx.state(model, nnx.Param)`` stays the frozen
  base model, ``nnx.state(model, LoraParam)`` is the trainable tree, and
  ``nnx.Optimizer(model, tx, wrt=LoraParam)`` keeps optimizer state for the adapters only.
  """
