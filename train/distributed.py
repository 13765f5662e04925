"""Multi-host setup: ``jax.distributed.initialize`` from the environment or the config.

``tools.launch_local`` (and a pod launcher of your own) sets ``JLORA_COORDINATOR``,
``JLORA_NUM_PROCESSES`` and ``JLORA_PROCESS_ID``; on TPU pods and SLURM/Kubernetes GPU clusters
``config.distributed.auto = True`` lets JAX detect the cluster itself. On CPU the collectives run
over gloo. A process that stops sending heartbeats for ``heartbeat_timeout_seconds`` makes the
coordination service terminate the others with an error naming the dead task: failures are
bounded in time, never a hang.
"""

import os

import jax
import ml_collections


def initialize(config: ml_collections.ConfigDict | None) -> bool:
  """Initializes JAX's distributed runtime when asked to; returns whether it did.

  Must run before anything touches a JAX device.
  """
  settings = config.get("distributed") if config is not None else None
  coordinator = os.environ.get("JLORA_COORDINATOR") or (settings.coordinator if settings else "")
  num_processes = int(os.environ.get("JLORA_NUM_PROCESSES") or (settings.num_processes if settings else 1))
  auto = bool(settings.auto) if settings else False
  if num_processes <= 1 and not auto:
    return False
  timeout = int(settings.heartbeat_timeout_seconds) if settings else 60
  if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
  else:
    process_id = int(os.environ.get("JLORA_PROCESS_ID") or settings.process_id)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=timeout, initialization_timeout=timeout)
  return True
