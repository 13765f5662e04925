"""Fine-tuning tasks of the training job, chosen by ``config.task``."""

import ml_collections

from train.tasks.base import Task


def build(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """Builds the task ``config.task`` ("classification" or "causal_lm")."""
  if config.task == "classification":
    from train.tasks import classification

    return classification.build(config, workdir)
  if config.task == "causal_lm":
    from train.tasks import causal_lm

    return causal_lm.build(config, workdir)
  raise ValueError(f"config.task must be 'classification' or 'causal_lm', got {config.task!r}")


__all__ = ["Task", "build"]
