"""jlora.variants: the adapter flavours, each a ``jlora.Variant`` value, and how a config selects one.

* ``LORA``: LoRA; with ``LoraConfig.init`` in ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` it starts from
  the kernel's SVD/QR factors and leaves the residual as the frozen base (PiSSA, OLoRA).
* ``DORA``: DoRA, LoRA's direction with a trained magnitude per output feature (``use_dora=True``).
* ``ALORA``: activated LoRA, LoRA from its invocation sequence on (``invocation_tokens=[...]``).
* ``VERA``: VeRA, shared frozen random projections and two trained vectors per kernel (``variant="vera"``).
* ``ADALORA``: AdaLoRA, LoRA in SVD form ``A, E, B`` whose triplets a budget prunes (``variant="adalora"``;
  ``jlora.adalora_allocator``, ``jlora.adalora_orth_loss``, ``jlora.adalora_resize``).
* ``variant_for(config)``: the variant a ``LoraConfig`` describes (``Lora`` and ``jlora.nnx`` use it).
* ``register(family, select, variants)``: adds a family (``LoraConfig.variant``, e.g. ``"vera"``): ``select``
  maps a config of that family to one of ``variants``.
* ``VARIANTS``: every registered variant by name; ``trainable_leaves()``: every variant's trainable leaf
  names (what optax routing treats as adapter leaves); ``vector_leaves()``: the per-feature vectors among them.
* ``to_plain_lora(adapters, initial, config, targets)``: a PiSSA/OLoRA adapter as the rank-``2r`` LoRA
  that applies to the *original* base (PEFT's ``path_initial_model_for_weight_conversion``).

The interface itself (``Variant``, ``Call``, and where frozen per-variant state lives) is documented in
``jlora._variant``.
"""

from collections.abc import Callable, Sequence

from jlora._errors import JloraError
from jlora._variant import Variant
from jlora.variants._adalora import ADALORA
from jlora.variants._alora import ALORA
from jlora.variants._alora import check_config as check_alora_config
from jlora.variants._convert import to_plain_lora
from jlora.variants._dora import DORA
from jlora.variants._lora import LORA
from jlora.variants._vera import VERA

VARIANTS: dict[str, Variant] = {}
# LoraConfig.variant -> the function that picks the family's variant for a config.
FAMILIES: dict[str, Callable] = {}


def register(family: str, select: Callable, variants: Sequence[Variant]) -> None:
  """Makes ``LoraConfig(variant=family)`` select ``select(config)``, one of ``variants``.

  Raises:
    JloraError: the family or a variant name is taken by something else.
  """
  if family in FAMILIES:
    raise JloraError(f"jlora.variants.register: the family {family!r} is registered already.")
  for variant in variants:
    if VARIANTS.get(variant.name, variant) is not variant:
      raise JloraError(f"jlora.variants.register: another variant is named {variant.name!r}.")
  FAMILIES[family] = select
  VARIANTS.update({variant.name: variant for variant in variants})


def unregister(family: str, variants: Sequence[Variant]) -> None:
  """Removes what ``register`` added (for tests and interactive use)."""
  FAMILIES.pop(family, None)
  for variant in variants:
    VARIANTS.pop(variant.name, None)


def trainable_leaves() -> tuple[str, ...]:
  """Every registered variant's trainable leaf names."""
  return tuple(dict.fromkeys(name for variant in VARIANTS.values() for name in variant.leaf_names))


def vector_leaves() -> tuple[str, ...]:
  """Every registered variant's per-feature vector leaves (PEFT's one-dimensional parameters)."""
  return tuple(dict.fromkeys(name for variant in VARIANTS.values() for name in variant.vector_leaves))


def variant_for(config) -> Variant:
  """The ``Variant`` a ``LoraConfig`` describes.

  Raises:
    JloraError: an unknown ``variant``, or options that do not combine (``use_dora`` outside the LoRA family).
  """
  if config.variant not in FAMILIES:
    raise JloraError(f"LoraConfig.variant={config.variant!r} is not an available adapter variant; "
                     f"available: {sorted(FAMILIES)} (DoRA is variant='lora' with use_dora=True).")
  if config.use_dora and config.variant != "lora":
    raise JloraError(f"LoraConfig.use_dora=True belongs to the LoRA family; variant={config.variant!r} has no DoRA.")
  if config.invocation_tokens is not None and config.variant != "lora":
    raise JloraError(f"LoraConfig.invocation_tokens (activated LoRA) belongs to the LoRA family; "
                     f"variant={config.variant!r} has no activated form.")
  return FAMILIES[config.variant](config)


def _lora_family(config) -> Variant:
  if config.invocation_tokens is not None:
    check_alora_config(config)
    return ALORA
  return DORA if config.use_dora else LORA


register("lora", _lora_family, (LORA, DORA, ALORA))
register("vera", lambda config: VERA, (VERA,))
register("adalora", lambda config: ADALORA, (ADALORA,))

__all__ = ["ADALORA", "ALORA", "DORA", "FAMILIES", "LORA", "VARIANTS", "VERA", "register", "to_plain_lora",
           "trainable_leaves", "unregister", "variant_for", "vector_leaves"]
