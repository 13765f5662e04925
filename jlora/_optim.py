"""optax helpers: route updates to adapter leaves only, and LoRA+ learning-rate groups as PEFT forms them."""

import re
from collections.abc import Callable, Sequence

import jax
import optax

from jlora._variant import Variant
from jlora.variants import trainable_leaves, vector_leaves


def _leaf_name(path) -> str | None:
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None))


def _joined(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _names(variant: Variant | None) -> set[str]:
  return set(trainable_leaves() if variant is None else variant.leaf_names)


def adapter_labels(tree, *, variant: Variant | None = None):
  """Labels every leaf of ``tree`` ``"adapter"`` (a variant's trainable leaf, e.g. ``lora_a``) or ``"frozen"``.

  ``variant=None`` recognises the trainable leaves of every variant (``jlora.variants.trainable_leaves()``).
  """
  names = _names(variant)
  return jax.tree_util.tree_map_with_path(lambda p, _: "adapter" if _leaf_name(p) in names else "frozen", tree)


def adapters_only(tx: optax.GradientTransformation, *, variant: Variant | None = None) -> optax.GradientTransformation:
  """Applies ``tx`` to adapter leaves and ``optax.set_to_zero()`` to every other leaf.

  For training code that keeps one combined tree (e.g. ``{"params": frozen, "lora": adapters}`` in a
  ``TrainState``): frozen leaves get zero updates and carry no optimizer state at all.

  Example:
    >>> import jax.numpy as jnp, optax, jlora
    >>> tree = {"params": {"w": jnp.ones((4, 4))}, "lora": {"w": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}}
    >>> tx = jlora.adapters_only(optax.adam(1e-3))
    >>> updates, _ = tx.update(tree, tx.init(tree), tree)
    >>> float(abs(updates["params"]["w"]).sum())
    0.0
  """
  return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()},
                               lambda tree: adapter_labels(tree, variant=variant))


def lora_plus(
    make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    lr_embedding: optax.ScalarOrSchedule = 1e-6,
    embedding: str | Sequence[str] | None = None,
    others: str = "frozen",
) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al., 2024) with PEFT's parameter groups (``peft.optimizers.create_loraplus_optimizer``).

  * ``lora_b`` and every one-dimensional per-kernel leaf (DoRA's ``lora_magnitude``: each variant's
    ``vector_leaves``): ``learning_rate * ratio``;
  * the factors of adapters on embedding tables: ``lr_embedding`` (PEFT's ``loraplus_lr_embedding``, 1e-6
    by default: an absolute rate, not a ratio). A magnitude vector on an embedding is one-dimensional and
    stays in the group above, as in PEFT;
  * every other adapter leaf (``lora_a``): ``learning_rate``;
  * leaves that are not adapter leaves: frozen (zero updates, no state), or with ``others="train"``
    trained like PEFT's other trainable parameters: one-dimensional ones (biases, norm scales) at
    ``learning_rate * ratio``, the rest at ``learning_rate``.

  PEFT also gives its ``bias``/LayerNorm group no weight decay; weight decay is ``make_tx``'s here.

  Args:
    make_tx: builds the optimizer from a learning rate, e.g. ``optax.adamw``.
    learning_rate: the learning rate (or schedule) of ``A``.
    ratio: ``lr_B / lr_A``.
    lr_embedding: the learning rate (or schedule) of embedding adapters' factors.
    embedding: regexes ``re.fullmatch``-ed against '/'-joined leaf paths that select embedding adapters'
      leaves. None: the leaves under a parameter named ``embedding`` (where ``jlora.Lora`` nests the adapter of
      an ``nn.Embed`` table). An nnx state tree holds factors beside the table (``embed/lora_a``): name its
      embedding modules, e.g. ``embedding=r"embed/.*"``.
    others: what non-adapter leaves get: ``"frozen"`` or ``"train"`` (see above).

  Returns:
    A transformation for adapter trees or combined trees.
  """
  if others not in ("frozen", "train"):
    raise ValueError(f"lora_plus: others must be 'frozen' or 'train', got {others!r}")
  if callable(learning_rate):
    learning_rate_b = lambda step: ratio * learning_rate(step)  # noqa: E731
  else:
    learning_rate_b = ratio * learning_rate
  rules = [re.compile(r) for r in ([embedding] if isinstance(embedding, str) else embedding or [])]

  def on_embedding(path) -> bool:
    if rules:
      return any(rule.fullmatch(_joined(path)) for rule in rules)
    return len(path) >= 2 and _leaf_name(path[:-1]) == "embedding"

  def labels(tree):
    trainable, vectors = trainable_leaves(), vector_leaves()

    def label(path, leaf):
      name = _leaf_name(path)
      if name in trainable:
        if name in vectors:
          return "b"
        if on_embedding(path):
          return "embedding"
        return "b" if name == "lora_b" else "a"
      if others == "frozen":
        return "frozen"
      return "b" if getattr(leaf, "ndim", 0) == 1 else "a"

    return jax.tree_util.tree_map_with_path(label, tree)

  return optax.multi_transform(
      {"a": make_tx(learning_rate), "b": make_tx(learning_rate_b), "embedding": make_tx(lr_embedding),
       "frozen": optax.set_to_zero()}, labels)
