"""The adapted module: a supported nnx module whose class is swapped for a subclass that adds the adapter.

Surgery changes the module's class in place (as ``torch.nn.utils.parametrize`` does) rather than
wrapping it, so the base parameters keep their paths (``.../q_proj/kernel`` is still
``.../q_proj/kernel``: base checkpoints load unchanged), every reference to a shared module sees the
adapter, and code holding the module keeps working. The adapted class ``Lora<Base>`` derives from the
module's own class; its methods call the original method for ``base(x)`` and add the variant's
low-rank path.

Attributes an adapted module gains:
  lora_a, lora_b, ...: ``LoraParam`` leaves (the variant's ``leaf_names``; LoRA's factors are shaped
    ``stack + batch + in + (r,)`` and ``stack + batch + (r,) + out``, see ``KernelLayout``).
  lora_target: the ``jlora.Target`` (path, layout, stack axes, rank, scale), static.
  lora_variant: the ``jlora.Variant``, static.
  lora_dropout: the adapter dropout rate, static.
  lora_merged: whether the update is folded into the kernel (then the adapter path is skipped).
  lora_memo: what the variant's merge returned for its unmerge (DoRA's column norms), a ``LoraMemo``
    variable while merged, else None.
  lora_state: the variant's shared frozen state, a ``LoraState`` variable shared by every adapted module
    (only for variants that have one).
  lora_shapes: ``((leaf name, shape), ...)`` of the leaves, checked at every call, static.
  deterministic: nnx's train/eval switch (``model.train()`` / ``model.eval()`` / ``nnx.view``).
  lora_rngs: the ``nnx.RngStream`` of adapter dropout (only with ``dropout > 0``).
"""

import functools
import types
from collections.abc import Callable

import jax
from flax import nnx

from jlora._dropout import inverted_dropout
from jlora._errors import JloraError
from jlora.nnx._bindings import Binding
from jlora.nnx._call import nnx_call

ATTRIBUTES = ("lora_target", "lora_variant", "lora_dropout", "lora_merged", "lora_memo", "lora_state", "lora_shapes",
              "deterministic", "lora_rngs")


class LoraModule(nnx.Module):
  """The base of every adapted class ``Lora<Base>``; never instantiated directly."""

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      deterministic: if True, disables adapter dropout.
    """
    if deterministic is not None:
      self.deterministic = deterministic

  def lora_adapter(self) -> dict[str, jax.Array]:
    """The adapter leaves as arrays, ``{"lora_a": A, "lora_b": B}`` for LoRA."""
    return {name: getattr(self, name)[...] for name in self.lora_variant.leaf_names}

  def lora_state_value(self):
    """The variant's shared frozen state (None when the variant has none)."""
    state = vars(self).get("lora_state")
    return None if state is None else state.get_value()

  def _lora_call(self, method: str, original: Callable, args: tuple, kwargs: dict):
    target, binding = self.lora_target, type(self)._lora_binding
    self._lora_check_shapes(binding)
    if self.lora_merged:
      return original(self, *args, **kwargs)
    dropout, training = self._lora_dropout_fn()
    call = nnx_call(self, method, original, binding, args, kwargs, target, dropout, training, self.lora_state_value())
    return self.lora_variant.apply(self.lora_adapter(), call)

  def _lora_check_shapes(self, binding: Binding) -> None:
    target = self.lora_target
    kernel_shape = tuple(getattr(self, binding.param).shape)
    if kernel_shape != target.layout.shape:
      hint = (" It is a stacked kernel: call it inside nnx.scan/nnx.vmap over its leading axes."
              if kernel_shape[len(target.stack_shape):] == target.layout.shape else "")
      raise JloraError(f"'{target.path}': {type(self).__name__} sees a kernel of shape {kernel_shape}, but its adapter "
                       f"was made for {target.layout.shape}.{hint}")
    n_stack = len(target.stack_shape)
    for name, shape in self.lora_shapes:
      got = tuple(getattr(self, name).shape)
      if got != shape[n_stack:]:
        raise JloraError(f"Adapter '{target.path}/{name}' has shape {got}, but rank {target.rank} on this "
                         f"{target.module_type} kernel {target.layout.shape} needs {shape[n_stack:]}: were the "
                         "adapters loaded from another model or LoraConfig (check rank/rank_pattern)?")

  def _lora_dropout_fn(self) -> tuple[Callable[[jax.Array], jax.Array], bool]:
    rate = self.lora_dropout
    if rate == 0.0 or self.deterministic:
      return (lambda x: x), False
    # One key per call: every use of the dropped input (the low-rank path, DoRA's frozen term) sees one mask.
    key = self.lora_rngs()
    return (lambda x: inverted_dropout(key, rate, x)), True


def _adapted_method(name: str, original: Callable) -> Callable:
  @functools.wraps(original)
  def method(self, *args, **kwargs):
    return self._lora_call(name, original, args, kwargs)

  return method


@functools.cache
def adapted_class(base: type, binding: Binding) -> type:
  """``Lora<Base>``: ``base`` with the binding's methods adding the adapter path (one class per base)."""
  namespace = {name: _adapted_method(name, getattr(base, name)) for name in binding.methods}
  namespace.update(_lora_base=base, _lora_binding=binding, __module__=__name__)
  return types.new_class(f"Lora{base.__name__}", (LoraModule, base), exec_body=lambda ns: ns.update(namespace))


def adapt_in_place(module: nnx.Module, binding: Binding, attributes: dict) -> None:
  """Gives ``module`` its adapter ``attributes`` and swaps its class for the adapted one."""
  cls = adapted_class(type(module), binding)
  for name, value in attributes.items():
    setattr(module, name, value)
  # object.__setattr__: the class is not an nnx attribute and must not enter the module's graph.
  object.__setattr__(module, "__class__", cls)


def strip_in_place(module: LoraModule) -> None:
  """Removes the adapter and restores the module's original class (the adapter is discarded)."""
  for name in (*module.lora_variant.leaf_names, *ATTRIBUTES):
    if name in vars(module):
      delattr(module, name)
  object.__setattr__(module, "__class__", type(module)._lora_base)
