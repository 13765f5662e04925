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
from orbax.checkpoint import multihost as ocp_multihost

# How long a barrier waits for the slowest process: process 0 may prepare a dataset, load and quantize a model or
# write an export while the others wait.
BARRIER_TIMEOUT_SECONDS = 3600


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


def barrier(name: str, timeout_seconds: int = BARRIER_TIMEOUT_SECONDS) -> None:
  """Waits until every process reaches ``name`` (each name once per run); a no-op in a single process.

  A barrier of the coordination service, not a collective: ``multihost_utils.sync_global_devices`` runs an
  all-reduce, whose gloo connection on CPU times out when one process arrives much later than the others
  (seen as "Gloo context initialization failed: Connect timeout" while process 0 prepared data and quantized the
  base). Here the waiting is bounded by ``timeout_seconds`` only, and a dead process still ends it through the
  heartbeats.
  """
  if jax.process_count() > 1:
    ocp_multihost.sync_global_processes(name, timeout=timeout_seconds, processes=set(range(jax.process_count())))
