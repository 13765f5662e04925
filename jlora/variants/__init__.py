"""jlora.variants: the adapter flavours, each a ``jlora.Variant`` value, and how a config selects one.

* ``LORA``: LoRA; with ``LoraConfig.init`` in ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` it starts from
  the kernel's SVD/QR factors and leaves the residual as the frozen base (PiSSA, OLoRA).
* ``DORA``: DoRA, LoRA's direction with a trained magnitude per output feature (``use_dora=True``).
* ``variant_for(config)``: the variant a ``LoraConfig`` describes (``Lora`` and ``jlora.nnx`` use it).
* ``VARIANTS``: every registered variant by name; ``TRAINABLE_LEAVES``: every variant's trainable leaf
  names (what optax routing treats as adapter leaves); ``VECTOR_LEAVES``: the per-feature vectors among them.
* ``to_plain_lora(adapters, initial, config, targets)``: a PiSSA/OLoRA adapter as the rank-``2r`` LoRA
  that applies to the *original* base (PEFT's ``path_initial_model_for_weight_conversion``).

The interface itself (``Variant``, ``Call``, and where frozen per-variant state lives) is documented in
``jlora._variant``.
"""

from jlora._errors import JloraError
from jlora.variants._convert import to_plain_lora
from jlora.variants._dora import DORA
from jlora.variants._lora import LORA

VARIANTS = {variant.name: variant for variant in (LORA, DORA)}
# The variant families a config's ``variant`` field names; "lora" covers LoRA and DoRA (``use_dora``).
FAMILIES = ("lora",)
TRAINABLE_LEAVES = tuple(dict.fromkeys(name for variant in VARIANTS.values() for name in variant.leaf_names))
VECTOR_LEAVES = tuple(dict.fromkeys(name for variant in VARIANTS.values() for name in variant.vector_leaves))


def variant_for(config) -> "Variant":  # noqa: F821
  """The ``Variant`` a ``LoraConfig`` describes.

  Raises:
    JloraError: an unknown ``variant``, or options that do not combine (``use_dora`` outside the LoRA family).
  """
  if config.variant not in FAMILIES:
    raise JloraError(f"LoraConfig.variant={config.variant!r} is not an available adapter variant; "
                     f"available: {list(FAMILIES)} (DoRA is variant='lora' with use_dora=True).")
  return DORA if config.use_dora else LORA


__all__ = ["DORA", "FAMILIES", "VECTOR_LEAVES", "LORA", "TRAINABLE_LEAVES", "VARIANTS", "to_plain_lora", "variant_for"]
