"""The models and compiled programs of one run, each built once and shared by every measurement that needs it.

Programs are compiled from abstract arguments (``jax.ShapeDtypeStruct``), so compiling a step never
allocates its model; a compiled program then runs on any concrete arrays of those shapes. Sections
that measure the same shape (the smoke suite uses one shape throughout) reuse the same compilations
instead of paying for them again.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax

from tools.bench._models import LinenSetup, Shape, full_train_step, linen_setup, lora_train_step, optimizer
from tools.bench._timing import CompiledStep, compile_step

Arm = Literal["full", "lora", "dora"]


class Workbench:
  """A per-run cache of linen setups (abstract and concrete) and compiled train steps.

  Compile figures (``CompiledStep.trace_lower_s``/``compile_s``) are those of the first, cold compile:
  every step is compiled from a fresh function object.
  """

  def __init__(self):
    self._cache: dict[tuple, Any] = {}
    self.tx = optimizer()

  def _get(self, key: tuple, build: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def abstract(self, shape: Shape, *, scan: bool, use_dora: bool = False) -> LinenSetup:
    """The linen model of ``shape`` with ``ShapeDtypeStruct`` params and adapters (DoRA's with ``use_dora``)."""
    return self._get(("abstract", shape, scan, use_dora),
                     lambda: linen_setup(shape, scan=scan, abstract=True, use_dora=use_dora))

  def concrete(self, shape: Shape, *, scan: bool, use_dora: bool = False) -> LinenSetup:
    """The linen model of ``shape`` with randomly initialised params and fresh adapters (``B = 0``)."""
    return self._get(("concrete", shape, scan, use_dora), lambda: linen_setup(shape, scan=scan, use_dora=use_dora))

  def train_step(self, shape: Shape, *, scan: bool, arm: Arm) -> CompiledStep:
    """The compiled full fine-tuning, LoRA or DoRA train step of ``shape``, donating its trainable and optimizer
    state.

    Argument order: full ``(params, opt_state, ids)``; LoRA and DoRA ``(adapters, opt_state, params, ids)``.
    """

    def build() -> CompiledStep:
      setup, tx = self.abstract(shape, scan=scan, use_dora=arm == "dora"), self.tx
      if arm == "full":
        return compile_step(full_train_step(setup.model, tx), setup.params, jax.eval_shape(tx.init, setup.params),
                            setup.ids, donate_argnums=(0, 1))
      return compile_step(lora_train_step(setup.lora, tx), setup.adapters, jax.eval_shape(tx.init, setup.adapters),
                          setup.params, setup.ids, donate_argnums=(0, 1))

    return self._get(("train_step", shape, scan, arm), build)

  def release(self, shape: Shape) -> None:
    """Drops everything built for ``shape`` (frees its params once no measurement needs them)."""
    for key in [k for k in self._cache if k[1] == shape]:
      del self._cache[key]
