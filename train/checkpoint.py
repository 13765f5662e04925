"""Training checkpoints with orbax: train state + data-iterator position, async, keep-N, SIGTERM-safe.

orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and finalises it by an atomic rename to
``<step>``, so a process killed mid-save (even ``kill -9``) leaves only complete checkpoints under step
names and auto-resume picks the latest one; the next start removes the unfinished temporary directory.
Deleting old checkpoints (keep-N) starts only after a newer one is final, so a kill there can only
leave a partly deleted *older* step, which resume never reads and the next clean-up removes.
"""

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves ``{"state": pytree, "data": json}`` every ``every`` steps and on a preemption signal.

  Args:
    workdir: checkpoints go to ``workdir/checkpoints/<step>``.
    every: save period in steps (0 disables periodic saves; the final and preemption saves remain).
    keep: how many complete checkpoints to keep.
    use_async: write in a background thread while training continues.
  """

  def __init__(self, workdir: str, *, every: int, keep: int = 3, use_async: bool = True):
    self.every = every
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._preempted = threading.Event()
    self._previous_handler = None
    if threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then stopping.")
    self._preempted.set()

  @property
  def preempted(self) -> bool:
    """True once SIGTERM arrived (the loop should save and stop)."""
    return self._preempted.is_set()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """``(state, data_state)`` of the latest complete checkpoint, restored onto ``abstract_state``'s
    shapes/dtypes/shardings, or None if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def maybe_save(self, step: int, state: Any, data_state: Mapping, *, force: bool = False) -> bool:
    """Saves at the period, or when ``force`` (final step, preemption). Returns whether it saved."""
    if not force and not (self.every and step % self.every == 0):
      return False
    if step in (self.manager.all_steps() or []):
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))), force=True)
    return True

  def close(self) -> None:
    """Waits for pending async saves and restores the previous SIGTERM handler."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def host_state(tree: Any) -> Any:
  """Replaces typed PRNG keys by their raw uint32 data, which every checkpoint format can store."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                      tree)
