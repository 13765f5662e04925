"""What the training loop needs from a task: frozen params, a trainable init, a loss and an eval."""

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

import jlora


@dataclasses.dataclass
class Task:
  """A fine-tuning task, built from the config by ``train.tasks.build``.

  Attributes:
    lora: the LoRA transform of the base model (its config is exported with the adapter).
    params: the frozen base params.
    init_trainable: ``key -> {"lora": adapters, ...}``; other entries (a task head) train too.
    loss: ``(trainable, params, batch, rng) -> (loss_sum, {"weight": n})`` over one micro-batch.
    eval_sums: ``(trainable, params, batch) -> {"loss_sum", "weight", ...}`` summed over a batch.
    summarize_eval: sums over the eval set -> ``{"eval/loss": ..., "eval/accuracy" | "eval/perplexity": ...}``.
    train_batches: a fresh, resumable (``get_state``/``set_state``) iterator of micro-batches.
    eval_batches: a fresh finite iterable of eval batches.
    count_tokens: real (non-padding) tokens in a host batch, for tokens/s.
    metadata: JSON-serialisable facts stored with the exported adapter.
  """

  lora: jlora.Lora
  params: Any
  init_trainable: Callable[[jax.Array], dict]
  loss: Callable
  eval_sums: Callable
  summarize_eval: Callable[[Mapping[str, float]], dict]
  train_batches: Callable[[], Any]
  eval_batches: Callable[[], Iterable[dict]]
  count_tokens: Callable[[dict], int]
  metadata: dict
