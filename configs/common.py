"""Config blocks shared by every training config: device mesh, multi-host setup, checkpoints."""

import ml_collections


def add_runtime(config: ml_collections.ConfigDict, *, checkpoint_every: int, keep: int) -> None:
  """Adds ``config.mesh``, ``config.distributed`` and ``config.checkpoint`` (documented per field)."""
  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = {"data": -1, "fsdp": 1, "tensor": 1}  # device mesh; one -1 takes the remaining devices
  config.mesh.rules = ()  # extra (regex, partition spec tuple) rules, before the model's defaults
  config.mesh.num_devices = 0  # use the first N devices of the job (0 = all)

  config.distributed = ml_collections.ConfigDict()
  config.distributed.auto = False  # let JAX detect a TPU pod / SLURM / k8s cluster (jax.distributed.initialize())
  config.distributed.coordinator = ""  # "host:port" of process 0 (env JLORA_COORDINATOR wins)
  config.distributed.num_processes = 1  # processes (hosts) in the job (env JLORA_NUM_PROCESSES wins)
  config.distributed.process_id = 0  # this process (env JLORA_PROCESS_ID wins)
  config.distributed.heartbeat_timeout_seconds = 60  # a silent process fails the job after this long

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = checkpoint_every  # steps between checkpoints (the last step is always saved)
  config.checkpoint.keep = keep  # complete checkpoints kept
  config.checkpoint.use_async = True  # write checkpoints in the background
