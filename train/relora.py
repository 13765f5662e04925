"""ReLoRA in the training job (``config.relora``): restarts in the loop, the update in the train state, the export.

With ``relora.every = N > 0``, after every N-th step except the last the job (``jlora.relora_restart``):

1. folds the adapters into ``state["relora"]["update"]``: the accumulated float32 ``W - W0`` of the targeted
   kernels only (4 bytes per targeted base parameter, whatever the number of restarts; the frozen base is never
   copied into the state or its checkpoints);
2. restarts the adapters: ``A`` fresh (its key from the seed and the step), ``B = 0``, DoRA's magnitude the new
   kernel's column norms, so the model's output does not change;
3. prunes the adapters' optimizer moments to their largest ``relora.keep_fraction`` by magnitude (``0``: reset;
   ``jlora.relora_prune``), keeping the step count and every other parameter's state;
4. trains on ``jlora.relora_apply(base, update)``: each targeted kernel ``W0 + update`` cast once to its dtype,
   computed by one compiled program after a restart and when a run resumes, so both give the same bits.

The learning rate follows ``jlora.relora_schedule`` (``train.optimizer``): the run's warmup + cosine, re-warmed over
``relora.warmup_steps`` after each restart.

A ReLoRA run's result is not one low-rank adapter. The export (``WORKDIR/adapter``) holds the last cycle's adapter
(``jlora.save_adapters``; its base fingerprint is the one of the base it trained on, so it loads only there) and
``relora_update/``: the whole ``W_final - W0`` of the targeted kernels (the last cycle folded in, float32) with
``relora_update.json`` (the original base's fingerprint, the step, the restarts). ``load_update(directory, base)``
checks the fingerprint and returns the update; ``jlora.relora_apply(base, update)`` is the fine-tuned model's
params, to serve or to write with ``jlora.models.save_pretrained``.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import jlora
from train.variants import overlay

UPDATE_DIR = "relora_update"
UPDATE_FORMAT = "jlora-relora-update/1"


class Relora:
  """ReLoRA's part of the loop. ``active`` is False when ``config.relora.every`` is 0 (or absent).

  Args:
    config: the job config (``relora.every``, ``relora.keep_fraction``, ``seed``).
    lora: the job's (traced) Lora.
  """

  def __init__(self, config: ml_collections.ConfigDict, lora: jlora.Lora):
    relora = config.get("relora")
    self.every = int(relora.every) if relora is not None else 0
    self.keep_fraction = float(relora.keep_fraction) if self.every else 1.0
    self.seed = config.seed
    self.lora = lora
    self._restart = self._kernels = self._fold = None

  @property
  def active(self) -> bool:
    return self.every > 0

  def due(self, step: int, total_steps: int) -> bool:
    """Whether the job restarts after ``step`` (never after the last one)."""
    return self.active and step % self.every == 0 and step < total_steps

  def restarts(self, step: int, total_steps: int) -> int:
    """How many restarts a run of ``total_steps`` has made once it completed ``step`` steps."""
    return sum(1 for s in range(1, step + 1) if self.due(s, total_steps))

  def initial_state(self, base: Mapping) -> dict:
    """``{"update": zeros}`` for the train state (``jlora.relora_init``)."""
    return {"update": jlora.relora_init(self.lora, base)}

  def specs(self, param_specs: Any) -> dict:
    """Partition specs of the update: each targeted kernel's own (``{"update": ...}``, to join the state's specs)."""
    return {"update": {k: _select(param_specs[k], v) for k, v in self._update_paths().items()}}

  def _update_paths(self) -> dict:
    tree: dict = {}
    for path in self.lora.targets:
      node = tree
      *parents, last = path.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = True
    return tree

  def compile(self, state_shardings: Any, base_shardings: Any) -> None:
    """Jits the restart and the base of a cycle, placed like the state and the base."""
    lora, keep, seed = self.lora, self.keep_fraction, self.seed
    update_shardings = state_shardings["relora"]["update"]

    def restart(state, base, step):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), step)
      update, adapters = jlora.relora_restart(lora, base, state["relora"]["update"], state["trainable"]["lora"], key)
      opt_state = jlora.relora_prune(lora, adapters, state["opt_state"], keep)
      return {**state, "trainable": {**state["trainable"], "lora": adapters}, "opt_state": opt_state,
              "relora": {"update": update}}

    def kernels(base, update):  # only the targeted kernels: the rest of the base is shared, not copied
      applied = jlora.relora_apply(base, update)
      return _pick(applied, update)

    self._restart = jax.jit(restart, in_shardings=(state_shardings, base_shardings, None),
                            out_shardings=state_shardings, donate_argnums=0)
    self._kernels = jax.jit(kernels, in_shardings=(base_shardings, update_shardings), out_shardings=update_shardings)
    self._fold = jax.jit(lambda base, update, adapters: jlora.relora_fold(lora, base, update, adapters),
                         out_shardings=update_shardings)

  def restart(self, state: dict, base: Mapping, step: int) -> dict:
    """The state after the restart that follows ``step`` (the donated ``state`` is consumed)."""
    return self._restart(state, base, np.int32(step))

  def trained_on(self, base: Mapping, state: dict, step: int) -> Mapping:
    """The base that step ``step + 1`` trains on: ``base`` itself before the first restart, else ``relora_apply``."""
    if not self.active or step < self.every:
      return base
    return overlay(base, self._kernels(base, state["relora"]["update"]))

  def describe(self, base: Mapping, total_steps: int) -> str:
    """One line for the job's start: the schedule and the size of the update next to the base's."""
    update_params = sum(int(np.prod(self.lora.targets[p].stack_shape + self.lora.targets[p].layout.shape))
                        for p in self.lora.targets)
    base_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(base))
    restarts = self.restarts(total_steps, total_steps)
    return (f"relora: restart every {self.every} steps ({restarts} in {total_steps}), optimizer moments kept: "
            f"{self.keep_fraction:g}; the update in the train state: {update_params:,} float32 values "
            f"({4 * update_params / 2**20:.1f} MiB) next to the frozen base's {base_bytes / 2**20:.1f} MiB")

  def export(self, directory: str, base: Mapping, state: dict, step: int, total_steps: int) -> dict:
    """Writes ``relora_update/`` (+ ``.json``) into ``directory``; returns the metadata for the adapter's extra."""
    update = self._fold(base, state["relora"]["update"], state["trainable"]["lora"])
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(os.path.abspath(directory), UPDATE_DIR), update)
    restarts = self.restarts(step, total_steps)
    metadata = {"format": UPDATE_FORMAT, "base_fingerprint": jlora.fingerprint(base), "step": step,
                "restarts": restarts, "every": self.every, "keep_fraction": self.keep_fraction,
                "kernels": list(self.lora.targets), "dtype": "float32",
                "use": "params = jlora.relora_apply(base_params, update)"}
    if jax.process_index() == 0:
      with open(os.path.join(directory, UPDATE_DIR + ".json"), "w") as f:
        json.dump(metadata, f, indent=2)
    return {"every": self.every, "restarts": restarts, "update": UPDATE_DIR}


def load_update(directory: str, base: Mapping) -> dict:
  """The ``W_final - W0`` a ReLoRA job exported to ``directory``, checked against ``base``'s fingerprint.

  Returns:
    The update (float32 arrays nested like ``base``): ``jlora.relora_apply(base, update)`` is the trained model.

  Raises:
    ValueError: ``directory`` holds no update, or ``base`` is not the base the job started from.
  """
  path = os.path.join(directory, UPDATE_DIR + ".json")
  if not os.path.exists(path):
    raise ValueError(f"{directory} holds no ReLoRA update ({UPDATE_DIR}.json): was it exported by a ReLoRA job?")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format") != UPDATE_FORMAT:
    raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {UPDATE_FORMAT!r}.")
  if metadata["base_fingerprint"] != jlora.fingerprint(base):
    raise ValueError(f"{path}: the update belongs to a base with fingerprint {metadata['base_fingerprint']}, not to "
                     "these params: load the base the job started from.")
  with ocp.StandardCheckpointer() as checkpointer:
    update = checkpointer.restore(os.path.join(os.path.abspath(directory), UPDATE_DIR))
  return jax.tree.map(np.asarray, update)


def _select(tree: Any, paths: Any) -> Any:
  """``tree``'s entries at the ``True`` leaves of ``paths`` (a nested dict)."""
  if paths is True:
    return tree
  return {k: _select(tree[k], v) for k, v in paths.items()}


def _pick(tree: Mapping, like: Mapping) -> dict:
  """``tree``'s entries at the leaf paths of ``like``."""
  return {k: _pick(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}
