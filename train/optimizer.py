"""The optimizer of the training job: AdamW with warmup + cosine decay, clipping, optional LoRA+."""

import ml_collections
import optax

import jlora


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``config.learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * final_lr_fraction`` at ``total_steps``."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW over the trainable tree (adapters and any task head).

  With ``lora_plus_ratio > 0`` the B factors get that many times the learning rate (LoRA+).
  """
  schedule = learning_rate_schedule(config, total_steps)

  def adamw(lr):
    return optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)

  tx = jlora.lora_plus(adamw, schedule, ratio=config.lora_plus_ratio, others="train") if config.lora_plus_ratio \
      else adamw(schedule)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx) if config.grad_clip_norm else tx
