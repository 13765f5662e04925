"""Fine-tuning tasks of the training job, chosen by ``config.task``."""

import jax
import ml_collections
from jax.sharding import Mesh

from train import distributed
from train.tasks.base import Task


def build(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Task:
  """Builds the task ``config.task`` ("classification" or "causal_lm"), its base loaded onto ``mesh``.

  With several processes, process 0 first writes what the task reads from the shared workdir (``prepare``: data,
  a local checkpoint), the others wait at a barrier, and then all build together: loading the base onto the mesh,
  and quantizing it, may run collectives, which every process must join at the same time.
  """
  if config.task == "classification":
    from train.tasks import classification as module
  elif config.task == "causal_lm":
    from train.tasks import causal_lm as module
  else:
    raise ValueError(f"config.task must be 'classification' or 'causal_lm', got {config.task!r}")
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      module.prepare(config, workdir)
    distributed.barrier("jlora_task_prepared")
  task = module.build(config, workdir, mesh)  # rewrites the same files (atomically) and reads them
  distributed.barrier("jlora_task_built")  # the collectives that follow start together (gloo's 30 s deadline)
  return task


__all__ = ["Task", "build"]
