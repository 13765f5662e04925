"""``save_merged``: base + adapter folded together in float32, written as a Hugging Face checkpoint."""

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora._config import LoraConfig
from jlora._lora import Lora
from jlora._safety import check_finite, write_manifest
from jlora.models._checkpoint import save_pretrained as save_checkpoint
from jlora.quant import dequantize


def save_merged(path: str | os.PathLike, model, params: Mapping, adapters: Mapping, config: LoraConfig,
                *example_inputs: Any, dtype: Any = None, manifest: bool = True) -> None:
  """Writes ``W' = W + s·A@B`` for every adapted kernel as a Hugging Face checkpoint directory.

  The merge is ``jlora.Lora.merge`` (float32 arithmetic, one cast to each kernel's dtype); the
  directory is ``jlora.models.save_pretrained``'s, so ``transformers`` (``AutoModelForCausalLM`` /
  ``AutoModel``) and ``jlora.models.from_pretrained`` load it without PEFT or jlora.

  Args:
    path: the output directory (must not hold other weights).
    model: the ``jlora.models`` module of the base.
    params: the base params (quantized kernels, ``jlora.quant``, are dequantized first).
    adapters: the adapter tree.
    config: its LoraConfig.
    *example_inputs: inputs for tracing ``model`` (default: one token).
    dtype: cast every merged param to this dtype before writing (default: keep the base's dtypes).
    manifest: also write a ``SHA256SUMS`` manifest.

  Raises:
    UnsafeAdapterError: NaN/inf in the adapters or in the merged params.
  """
  check_finite(adapters, "to merge")
  params = dequantize(params)  # a quantized base is written as float kernels of its original dtype
  lora = Lora(model, config)
  lora.trace(params, *(example_inputs or (jnp.zeros((1, 1), jnp.int32),)))
  merged = jax.jit(lora.merge)(params, adapters)  # one compilation for every kernel
  if dtype is not None:
    merged = jax.tree.map(lambda x: jnp.asarray(x, dtype), merged)
  check_finite(merged, "merged into the base (the update overflows the kernel's dtype)")
  save_checkpoint(path, model, merged)
  if manifest:
    write_manifest(path)
