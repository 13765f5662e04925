"""jlora.quant: QLoRA's frozen base: kernels in 4-bit (NF4, FP4) or int8 blocks, dequantized inside the
module call that uses them.

``quantize(params, targets)`` turns each targeted kernel into a ``QuantizedArray`` (a pytree: packed codes
and block statistics, with QLoRA's double quantization by default), bit for bit the layout bitsandbytes
gives the same weight. The model stays unmodified: ``jlora.Lora(model, config).apply(qparams, adapters, x)``
and ``jlora.quant.apply(model, qparams, x)`` dequantize a kernel inside its own module's call (under
``nn.scan``, one layer at a time; the backward pass dequantizes again rather than keep a float copy).

Public API:

* ``quantize(params, targets, kind="nf4", block_size=64, double_quant=True)``, ``dequantize(tree)``.
* ``apply(model, params, *inputs)``, ``apply_fn(model)``, ``intercept()``: inference without adapters.
* ``merge(lora, params, adapters, dtype=bfloat16, requantize=False)``, ``MergeReport``, ``MergeRow``.
* ``partition_specs(leaf, kernel_spec, mesh=None)``, ``kernel_spec(specs)``: sharding of quantized leaves
  (``jlora.sharding.param_specs`` applies them to every quantized kernel itself).
* ``footprint(params)``, ``Footprint``: parameters and bytes, bytes per quantized parameter.
* ``quantize_nnx(model, targets, ...)``: the same for a ``flax.nnx`` model, in place.
* ``QuantizedArray``, ``quantize_array``, ``Quantized``, ``is_quantized``, ``logical_shapes``, ``KINDS``.
* ``GgufBlocks``, ``gguf_blocks``, ``quantize_gguf``, ``GGUF_TYPES``: a kernel kept in a GGUF file's own
  Q4_0 / Q4_1 / Q8_0 blocks (``jlora.models.from_pretrained(path.gguf, quantized="keep")``), dequantized
  bit for bit as the ``gguf`` package does.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
  >>> from jlora import quant
  >>> model = nn.Dense(32, name="proj")
  >>> x = jnp.ones((2, 128))
  >>> qparams = quant.quantize(model.init(jax.random.key(0), x)["params"], "kernel")
  >>> lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4))
  >>> adapters = lora.init(jax.random.key(1), qparams, x)
  >>> lora.apply(qparams, adapters, x).shape
  (2, 32)
  >>> round(quant.footprint(qparams).bytes_per_param, 3)   # 4096 params: 4.14 bits each, 4.127 when large
  0.518
"""

from jlora.quant._call import apply, apply_fn, intercept
from jlora.quant._footprint import Footprint, footprint
from jlora.quant._gguf_blocks import GGUF_TYPES, GgufBlocks, gguf_blocks, quantize_gguf
from jlora.quant._merge import MergeReport, MergeRow, merge
from jlora.quant._nnx import quantize_nnx
from jlora.quant._qarray import KINDS, QuantizedArray, quantize_array
from jlora.quant._quantized import Quantized, is_quantized
from jlora.quant._specs import kernel_spec, partition_specs
from jlora.quant._tree import dequantize, logical_shapes, quantize

__all__ = [
    "Footprint",
    "GGUF_TYPES",
    "GgufBlocks",
    "KINDS",
    "MergeReport",
    "MergeRow",
    "Quantized",
    "QuantizedArray",
    "apply",
    "apply_fn",
    "dequantize",
    "footprint",
    "gguf_blocks",
    "intercept",
    "is_quantized",
    "kernel_spec",
    "logical_shapes",
    "merge",
    "partition_specs",
    "quantize",
    "quantize_array",
    "quantize_gguf",
    "quantize_nnx",
]
