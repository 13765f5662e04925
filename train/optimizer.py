"""The optimizer of the training job: AdamW with warmup + cosine decay, clipping, optional LoRA+, and what a
variant adds: ReLoRA's jagged schedule (``config.relora``), AdaLoRA's rank allocator."""

import ml_collections
import optax

import jlora


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           relora: ml_collections.ConfigDict | None = None) -> optax.Schedule:
  """Linear warmup to ``config.learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * final_lr_fraction`` at ``total_steps``.

  With ``relora.every`` set, ReLoRA's jagged form (``jlora.relora_schedule``): after every restart the rate drops
  to zero and climbs back to that curve over ``relora.warmup_steps``.
  """
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)
  if relora is not None and relora.every:
    schedule = jlora.relora_schedule(schedule, relora.every, relora.warmup_steps)
  return schedule


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, *,
                   relora: ml_collections.ConfigDict | None = None,
                   lora_config: jlora.LoraConfig | None = None) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW over the trainable tree (adapters and any task head).

  With ``lora_plus_ratio > 0`` the B factors get that many times the learning rate (LoRA+). With an AdaLoRA
  ``lora_config`` the rank allocator (``jlora.adalora_allocator``) follows AdamW, after clipping, so its
  sensitivities ``|p * g|`` see the clipped gradients, as PEFT's allocator reads them after the Trainer's
  clipping; its scores and masks live in the optimizer state (checkpointed).
  """
  schedule = learning_rate_schedule(config, total_steps, relora)

  def adamw(lr):
    return optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)

  tx = jlora.lora_plus(adamw, schedule, ratio=config.lora_plus_ratio, others="train") if config.lora_plus_ratio \
      else adamw(schedule)
  if lora_config is not None and lora_config.variant == "adalora":
    tx = jlora.adalora_allocator(tx, lora_config)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx) if config.grad_clip_norm else tx
