"""optax helpers: route updates to adapter leaves only, and LoRA+ learning-rate ratios."""

from collections.abc import Callable

import jax
import optax

from jlora._variant import LORA, Variant


def _leaf_name(path) -> str | None:
  last = path[-1] if path else None
  return getattr(last, "key", getattr(last, "name", None))


def adapter_labels(tree, *, variant: Variant = LORA):
  """Labels every leaf of ``tree`` ``"adapter"`` (a variant leaf such as ``lora_a``) or ``"frozen"``."""
  names = set(variant.leaf_names)
  return jax.tree_util.tree_map_with_path(lambda p, _: "adapter" if _leaf_name(p) in names else "frozen", tree)


def adapters_only(tx: optax.GradientTransformation, *, variant: Variant = LORA) -> optax.GradientTransformation:
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
    others: str = "frozen",
) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al., 2024): ``B`` learns ``ratio`` times faster than ``A``.

  Args:
    make_tx: builds the optimizer from a learning rate, e.g. ``optax.adamw``.
    learning_rate: the learning rate (or schedule) of ``A``.
    ratio: ``lr_B / lr_A``.
    others: what non-adapter leaves get: ``"frozen"`` (zero updates, no state) or ``"train"`` (the
      optimizer at ``learning_rate``, e.g. for a task head trained beside the adapters).

  Returns:
    A transformation for adapter trees or combined trees.
  """
  if others not in ("frozen", "train"):
    raise ValueError(f"lora_plus: others must be 'frozen' or 'train', got {others!r}")
  if callable(learning_rate):
    learning_rate_b = lambda step: ratio * learning_rate(step)  # noqa: E731
  else:
    learning_rate_b = ratio * learning_rate

  def labels(tree):
    def label(path, _):
      name = _leaf_name(path)
      return "b" if name == "lora_b" else "a" if name in LORA.leaf_names or others == "train" else "frozen"

    return jax.tree_util.tree_map_with_path(label, tree)

  return optax.multi_transform(
      {"a": make_tx(learning_rate), "b": make_tx(learning_rate_b), "frozen": optax.set_to_zero()}, labels)
