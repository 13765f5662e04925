"""Fine-tuning tasks of the training job, chosen by ``config.task``."""

import jax
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from train.tasks.base import Task


def build(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  """Builds the task ``config.task`` ("classification" or "causal_lm"), its base loaded onto ``mesh``.

  With several processes, process 0 builds first (writing datasets and any local checkpoint into the
  shared workdir) and the others follow after a barrier, reusing what it wrote.
  """
  if config.task == "classification":
    from train.tasks import classification as module
  elif config.task == "causal_lm":
    from train.tasks import causal_lm as module
  else:
    raise ValueError(f"config.task must be 'classification' or 'causal_lm', got {config.task!r}")
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    multihost_utils.sync_global_devices("jlora_task_prepared")
  task = module.build(config, workdir, mesh)
  if several and jax.process_index() == 0:
    multihost_utils.sync_global_devices("jlora_task_prepared")
  return task


__all__ = ["Task", "build"]
