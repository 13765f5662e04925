"""Config blocks shared by every training config: device mesh, multi-host setup, checkpoints, adapter variants."""

import ml_collections
from ml_collections.config_dict import placeholder


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


def add_quantization(config: ml_collections.ConfigDict, targets: str) -> None:
  """Adds QLoRA's quantized frozen base to ``config.model`` (documented per field); off by default."""
  config.model.quantize = ""  # QLoRA base: "" (as loaded), "nf4"/"fp4"/"int8" (jlora.quant), "gguf" (keep Q4/Q8 blocks)
  config.model.quantize_targets = targets  # nf4/fp4/int8: regex of the kernels quantized after loading
  config.model.block_size = 64  # nf4/fp4/int8: elements per absmax block (a sharded input axis holds whole blocks)
  config.model.double_quant = True  # nf4/fp4/int8: block statistics in 8 bits too (QLoRA's double quantization)


def add_variants(config: ml_collections.ConfigDict) -> None:
  """Adds the adapter variant's fields to ``config.lora`` and ReLoRA's ``config.relora`` (documented per field).

  Options of a variant left unset (``None``) take PEFT's defaults (``jlora.LoraConfig``); options of another
  variant than ``lora.variant`` must stay unset. The job (``train.variants``) sets AdaLoRA's ``total_step`` to
  ``train.steps``.
  """
  lora = config.lora
  lora.use_dora = False  # DoRA: LoRA's direction plus a trained magnitude per output feature (variant "lora")
  lora.variant = "lora"  # "lora" (LoRA, DoRA, PiSSA/OLoRA via init), "vera" (VeRA), "adalora" (AdaLoRA)
  lora.projection_seed = placeholder(int)  # VeRA: seed of the shared frozen random projections (default 0)
  lora.d_initial = placeholder(float)  # VeRA: initial lambda_d (default 0.1)
  lora.save_projection = placeholder(bool)  # VeRA: a PEFT export stores the projections (default True)
  lora.init_rank = placeholder(int)  # AdaLoRA: initial rank of every adapter (default 12; lora.rank must be 8 or it)
  lora.target_rank = placeholder(int)  # AdaLoRA: average rank the budget prunes to (default 8)
  lora.tinit = placeholder(int)  # AdaLoRA: steps before pruning starts (default 0)
  lora.tfinal = placeholder(int)  # AdaLoRA: last steps with the final allocation fixed (default 0)
  lora.delta_t = placeholder(int)  # AdaLoRA: steps between two allocations (default 1)
  lora.beta1 = placeholder(float)  # AdaLoRA: EMA factor of the sensitivity (default 0.85)
  lora.beta2 = placeholder(float)  # AdaLoRA: EMA factor of its uncertainty (default 0.85)
  lora.orth_reg_weight = placeholder(float)  # AdaLoRA: weight of the orthogonal regulariser in the loss (default 0.5)

  config.relora = ml_collections.ConfigDict()  # ReLoRA (train.relora): merge-and-restart, LoRA/DoRA with random init
  config.relora.every = 0  # fold the adapters into the base and restart them every N steps (0 = no ReLoRA)
  config.relora.warmup_steps = 10  # learning-rate re-warmup after each restart (jagged schedule)
  config.relora.keep_fraction = 0.01  # adapter optimizer moments kept at a restart, by magnitude (paper: 1%); 0 = reset
