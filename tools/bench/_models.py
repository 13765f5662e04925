"""The benchmarked model: ``jlora.models.LlamaForCausalLM`` from random init, its LoRA and its train steps.

Every contender trains the same thing: next-token cross-entropy on a random token batch, one AdamW
update per step. Full fine-tuning differentiates and updates every parameter; LoRA differentiates
and updates only the adapter tree while the base params are a frozen (non-donated) argument.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import models

# Every linear projection of every decoder layer, the usual "all-linear" LoRA recipe (QLoRA, PEFT's
# target_modules="all-linear" minus lm_head). The same names select the nnx and PEFT peers' layers.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 16
LORA_ALPHA = 32.0
LEARNING_RATE = 1e-4


def lora_config(*, use_dora: bool = False) -> jlora.LoraConfig:
  """The LoRA recipe benchmarked everywhere: rank 16, alpha 32, all seven projections, no dropout (DoRA: the same
  recipe with ``use_dora=True``)."""
  return jlora.LoraConfig(targets=rf".*/({'|'.join(PROJECTIONS)})/kernel", rank=LORA_RANK, alpha=LORA_ALPHA,
                          use_dora=use_dora)


# The same rank on one projection only (the first layer's q_proj, layers unrolled): its train step is
# the frozen base's forward and input-gradient backward plus a negligible adapter, so "all projections
# minus this" is what the low-rank paths themselves cost, in jlora and in PEFT alike.
ONE_ADAPTER_TARGET = r".*/layers_0/self_attn/q_proj/kernel"
ONE_ADAPTER_PEFT_TARGET = r".*layers\.0\.self_attn\.q_proj"


def optimizer() -> optax.GradientTransformation:
  """AdamW, the optimizer of both full fine-tuning and LoRA (and of the PEFT peer)."""
  return optax.adamw(LEARNING_RATE)


@dataclasses.dataclass(frozen=True)
class Shape:
  """A Llama-style decoder and the batch it trains on.

  Attributes:
    hidden: model width ``d_model``.
    intermediate: gated-MLP width.
    layers: decoder layers.
    heads: query heads.
    kv_heads: key/value heads (grouped-query attention).
    vocab: vocabulary size.
    batch: sequences per step.
    seq: tokens per sequence ``T``.
  """

  hidden: int
  intermediate: int
  layers: int
  heads: int
  kv_heads: int
  vocab: int
  batch: int
  seq: int

  @property
  def label(self) -> str:
    """A short name for result keys, e.g. ``d2048_t512``."""
    return f"d{self.hidden}_t{self.seq}"

  def describe(self) -> str:
    return (f"d_model={self.hidden}, ffn={self.intermediate}, layers={self.layers}, heads={self.heads}/"
            f"{self.kv_heads} kv, vocab={self.vocab}, batch={self.batch}, T={self.seq}")

  def llama_config(self, *, scan: bool) -> models.LlamaConfig:
    """The ``LlamaConfig`` of this shape, float32, layers stacked with ``nn.scan`` or unrolled."""
    return models.LlamaConfig(
        vocab_size=self.vocab,
        hidden_size=self.hidden,
        intermediate_size=self.intermediate,
        num_hidden_layers=self.layers,
        num_attention_heads=self.heads,
        num_key_value_heads=self.kv_heads,
        max_position_embeddings=max(2048, self.seq),
        scan_layers=scan,
    )

  def token_batch(self, key: jax.Array) -> jax.Array:
    """Random token ids ``(batch, seq)``."""
    return jax.random.randint(key, (self.batch, self.seq), 0, self.vocab, jnp.int32)


@dataclasses.dataclass(frozen=True)
class LinenSetup:
  """A ``LlamaForCausalLM``, its frozen params, a traced ``jlora.Lora`` and fresh adapters.

  With ``abstract=True`` in :func:`linen_setup` the params and adapters are ``jax.ShapeDtypeStruct``s,
  enough to compile and analyse a step without allocating it.
  """

  model: models.LlamaForCausalLM
  params: Any
  lora: jlora.Lora
  adapters: Any
  ids: jax.Array


def linen_setup(shape: Shape, *, scan: bool, abstract: bool = False, seed: int = 0,
                use_dora: bool = False) -> LinenSetup:
  """Builds the linen model of ``shape`` from random init, with its LoRA (or DoRA) adapters (``B = 0``)."""
  model = models.LlamaForCausalLM(shape.llama_config(scan=scan))
  keys = jax.random.split(jax.random.key(seed), 3)
  ids = shape.token_batch(keys[0])
  init = jax.jit(lambda key: model.init(key, ids)["params"])
  params = jax.eval_shape(init, keys[1]) if abstract else init(keys[1])
  lora = jlora.Lora(model, lora_config(use_dora=use_dora))
  # DoRA's magnitude starts from the kernels' values: abstract params give abstract adapters through eval_shape.
  adapters = jax.eval_shape(lora.init, keys[2], params, ids) if abstract else lora.init(keys[2], params, ids)
  return LinenSetup(model, params, lora, adapters, ids)


def with_trained_b(adapters: Any, seed: int = 1) -> Any:
  """The adapters with small random ``B`` factors, as after training (``B = 0`` would make merging a no-op)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [
      0.01 * jax.random.normal(k, leaf.shape, leaf.dtype) if jax.tree_util.keystr(path).endswith("['lora_b']") else leaf
      for (path, leaf), k in zip(leaves, keys, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


def next_token_loss(logits_btv: jax.Array, ids_bt: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting token ``t + 1`` from position ``t``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_btv[:, :-1], ids_bt[:, 1:]).mean()


def full_train_step(model: models.LlamaForCausalLM, tx: optax.GradientTransformation) -> Callable:
  """``step(params, opt_state, ids) -> (params, opt_state)``: full fine-tuning (a fresh function)."""

  def step(params, opt_state, ids):
    grads = jax.grad(lambda p: next_token_loss(model.apply({"params": p}, ids), ids))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def lora_train_step(lora: jlora.Lora, tx: optax.GradientTransformation) -> Callable:
  """``step(adapters, opt_state, params, ids) -> (adapters, opt_state)``: LoRA (a fresh function)."""

  def step(adapters, opt_state, params, ids):
    grads = jax.grad(lambda a: next_token_loss(lora.apply(params, a, ids), ids))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  return step


def copy_tree(tree: Any) -> Any:
  """A copy with its own buffers, for a step that donates (and so deletes) its inputs."""
  return jax.tree.map(jnp.copy, tree)
