"""qwix's QLoRA, the JAX peer of ``jlora.quant``: ``qwix.LoraProvider`` with ``LoraRule(weight_qtype="nf4",
tile_size=64)`` on the same ``LlamaForCausalLM``, the same seven projections, rank and alpha.

qwix rewrites the model's ``dot_general`` calls: at ``init`` a rule's weights become ``WithAux(QArray)`` leaves
(4-bit NF4 codes in ``uint4`` plus a float scale per 64 inputs, no double quantization) next to the adapters
``kernel_lora_a`` / ``kernel_lora_b``, which take the dtype of that scale (bf16 for a bf16 model, where jlora's
adapters default to float32: ``tools.bench._qlora`` times jlora with bf16 adapters against it). Its train step here is the benchmark's recipe (next-token cross-entropy,
AdamW on the adapters only) over ``(adapters, optimizer state, frozen params, ids)``, as jlora's is.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from tools.bench._models import LORA_ALPHA, LORA_RANK, PROJECTIONS, next_token_loss

_ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
QWIX_MISSING = "qwix is not installed (pip install qwix; it is in jlora's test extra)"


@dataclasses.dataclass(frozen=True)
class QwixSetup:
  """qwix's LoRA model of a linen model and its split parameters (abstract or concrete).

  Attributes:
    model: the model ``qwix.apply_lora_to_model`` returned.
    adapters: ``{"path/kernel_lora_a": array, ...}``, the trained leaves.
    frozen: every other leaf by '/'-joined path (quantized weights as qwix's ``WithAux``).
  """

  model: Any
  adapters: dict
  frozen: dict


def available() -> bool:
  try:
    import qwix  # noqa: F401
  except ImportError:
    return False
  return True


def qwix_setup(model: Any, ids: jax.Array, *, abstract: bool, seed: int = 1) -> QwixSetup:
  """qwix's QLoRA of ``model`` (NF4 in tiles of 64 on the seven projections), its params from ``init``."""
  import qwix

  rule = qwix.LoraRule(module_path=rf".*/({'|'.join(PROJECTIONS)})", rank=LORA_RANK, alpha=LORA_ALPHA,
                       weight_qtype="nf4", tile_size=64)
  lora_model = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
  init = jax.jit(lambda key: lora_model.init(key, ids)["params"])
  params = jax.eval_shape(init, jax.random.key(seed)) if abstract else init(jax.random.key(seed))
  flat = traverse_util.flatten_dict(params, sep="/")
  adapters = {k: v for k, v in flat.items() if k.endswith(_ADAPTER_SUFFIXES)}
  frozen = {k: v for k, v in flat.items() if not k.endswith(_ADAPTER_SUFFIXES)}
  if not adapters or not any(_is_quantized(v) for v in frozen.values()):
    raise RuntimeError(f"qwix made {len(adapters)} adapters and quantized no weight: its rule matched nothing "
                       f"(param paths such as {sorted(flat)[:4]}).")
  return QwixSetup(lora_model, adapters, frozen)


def _is_quantized(leaf: Any) -> bool:
  return type(leaf).__name__ == "WithAux"


def quantized_leaves(frozen: dict) -> dict:
  """The quantized weights of ``frozen`` (qwix's ``WithAux``) by path."""
  return {k: v for k, v in frozen.items() if _is_quantized(v)}


def qwix_train_step(setup: QwixSetup, tx: optax.GradientTransformation) -> Callable:
  """``step(adapters, opt_state, frozen, ids) -> (adapters, opt_state)`` (a fresh function)."""
  model = setup.model

  def step(adapters, opt_state, frozen, ids):
    def loss(adapters):
      params = traverse_util.unflatten_dict({**frozen, **adapters}, sep="/")
      return next_token_loss(model.apply({"params": params}, ids), ids)

    grads = jax.grad(loss)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  return step


def stored_bits(frozen: dict) -> tuple[int, int]:
  """``(weights, bits)`` of qwix's quantized weights as their dtypes define them: the float weights' count, and
  the bits of their codes (``uint4``: 4 per code) and scales."""
  weights = bits = 0
  for leaf in quantized_leaves(frozen).values():
    qarray = leaf.array
    weights += qarray.qvalue.size
    for stored in jax.tree.leaves(qarray):
      bits += stored.size * jnp.iinfo(stored.dtype).bits if jnp.issubdtype(stored.dtype, jnp.integer) else \
          stored.size * jnp.dtype(stored.dtype).itemsize * 8
  return weights, bits


def describe_storage(frozen: dict) -> str:
  """What one of qwix's quantized weights stores, e.g. ``uint4 codes (1024, 2048), bfloat16 scale (16, 2048)``."""
  qarray = next(iter(quantized_leaves(frozen).values())).array
  return (f"{jnp.dtype(qarray.qvalue.dtype).name} codes {tuple(qarray.qvalue.shape)}, "
          f"{jnp.dtype(qarray.scale.dtype).name} scale {tuple(qarray.scale.shape)} per weight")
