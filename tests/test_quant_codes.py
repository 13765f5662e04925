"""jlora.quant's codes against bitsandbytes 0.50 (CPU), the reference QLoRA implementation.

bitsandbytes quantizes torch's ``[out, in]`` weight, so each flax kernel ``(in, out)`` is compared through its
transpose. Its quantization on CPU is its pure-torch reference path. Dequantization is compared with that
reference path too (reached with a dispatch to its CompositeExplicitAutograd kernel): bitsandbytes' native CPU
``dequantize_4bit`` disagrees with its own reference whenever 64-blocks straddle rows of an even width that is not a
multiple of 64 (e.g. rows of 96, from element 128 on), so its public call is compared only on the rows layout.
"""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # bitsandbytes' reference ops would torch.compile

import bitsandbytes.functional as bnb  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from jlora import quant  # noqa: E402
from jlora.quant._codebooks import DYNAMIC, FP4, NF4  # noqa: E402
from jlora.quant._fourbit import unpack  # noqa: E402

_REFERENCE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

# (in, out): rows layout; blocks straddling rows (in 96); an odd element count with a short all-zero last block;
# more blocks than one 256-group of statistics and a short group.
SHAPES = [(128, 48), (96, 40), (37, 5), (256, 80)]


def _kernel(shape, seed, dtype=np.float32, ties=None):
  """A kernel ``(in, out)`` whose torch weight has an all-zero block (64..127), an all-zero short last block
  when the element count is not a multiple of 64, and, with ``ties``, block 0 scaled by exactly 1.0 and
  holding every midpoint between two levels (which round to the lower level)."""
  n_in, n_out = shape
  weight = (0.05 * np.random.default_rng(seed).standard_normal((n_out, n_in))).astype(np.float32)
  flat = weight.reshape(-1)
  flat[64:128] = 0
  flat[flat.size - flat.size % 64:] = 0
  if ties is not None:
    flat[0] = 1.0
    flat[1:1 + ties.midpoints.size] = ties.midpoints
    flat[1 + ties.midpoints.size:2 + 2 * ties.midpoints.size] = np.append(-ties.midpoints, -1.0)
  return weight.T.astype(dtype)


def _torch_weight(kernel):
  weight = torch.from_numpy(np.asarray(kernel, np.float32).T.copy())
  return weight.to(torch.bfloat16) if kernel.dtype == ml_dtypes.bfloat16 else weight


def _reference_dequantize_4bit(packed, absmax, kind, weight_shape):
  return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
      _REFERENCE, packed, absmax, 64, kind, list(weight_shape), torch.float32).numpy()


def test_codebooks_are_bitsandbytes_tables():
  np.testing.assert_array_equal(NF4.levels, bnb.get_4bit_type("nf4", "cpu").numpy())
  np.testing.assert_array_equal(FP4.levels, bnb.get_4bit_type("fp4", "cpu").numpy())
  np.testing.assert_array_equal(DYNAMIC.levels, bnb.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_4bit_codes_absmax_and_values_equal_bitsandbytes(kind, shape):
  kernel = _kernel(shape, seed=sum(shape), ties={"nf4": NF4, "fp4": FP4}[kind])
  weight = _torch_weight(kernel)
  packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=kind, compress_statistics=False)
  q = quant.quantize_array(jnp.asarray(kernel), kind, block_size=64, double_quant=False)

  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))  # bytes
  np.testing.assert_array_equal(np.asarray(unpack(q.codes)).reshape(-1),  # every 4-bit code
                                np.asarray(unpack(jnp.asarray(packed.numpy().reshape(-1)))))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  reference = _reference_dequantize_4bit(packed, state.absmax, kind, weight.shape)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), reference.T)
  if q.rows:  # bitsandbytes' native CPU kernel agrees with its reference on this layout
    np.testing.assert_array_equal(np.asarray(q.dequantize()), bnb.dequantize_4bit(packed, state).numpy().T)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bf16_kernels_quantize_like_bitsandbytes(kind):
  kernel = _kernel((128, 16), seed=3, dtype=ml_dtypes.bfloat16)
  weight = _torch_weight(kernel)
  packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=kind)
  q = quant.quantize_array(jnp.asarray(kernel), kind, block_size=64, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  assert q.dequantize().dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q.dequantize(), np.float32),
                                bnb.dequantize_4bit(packed, state).float().numpy().T)


@pytest.mark.parametrize("shape", [(256, 80), (96, 40)], ids=lambda s: "x".join(map(str, s)))
def test_double_quantized_statistics_round_to_nearest_like_bitsandbytes(shape):
  kernel = _kernel(shape, seed=7)
  weight = _torch_weight(kernel)
  q = quant.quantize_array(jnp.asarray(kernel), "nf4", block_size=64, double_quant=True)
  plain = quant.quantize_array(jnp.asarray(kernel), "nf4", block_size=64, double_quant=False)
  packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))

  # The offset is the mean absmax; torch and XLA sum in different orders (a last-bit difference at most).
  np.testing.assert_allclose(float(q.absmax_offset), float(state.offset), rtol=2e-7)
  # Given the same centred statistics, the 8-bit codes and group scales are bitsandbytes' reference rounding.
  centred = torch.from_numpy(np.asarray(plain.absmax).reshape(-1) - np.asarray(q.absmax_offset))
  codes, scale = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
      _REFERENCE, centred, torch.from_numpy(DYNAMIC.levels.copy()), 256)
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), codes.numpy())
  np.testing.assert_array_equal(np.asarray(q.absmax_scale), scale.numpy())

  # Dequantized weights agree with bitsandbytes' within its own 8-bit statistic error.
  bnb_absmax = (torch.ops.bitsandbytes.dequantize_blockwise.default.redispatch(
      _REFERENCE, state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset)
  statistic_error = float(np.max(np.abs(bnb_absmax.numpy() - np.asarray(plain.absmax).reshape(-1))))
  assert statistic_error > 0
  reference = _reference_dequantize_4bit(packed, bnb_absmax, "nf4", weight.shape).T
  levels = NF4.value(unpack(q.codes)).reshape(-1)[: kernel.size].reshape(weight.shape).T
  np.testing.assert_array_less(np.abs(np.asarray(q.dequantize()) - reference),
                               np.abs(np.asarray(levels)) * statistic_error + 1e-12)


def test_int8_with_row_blocks_is_bitsandbytes_llm_int8():
  kernel = _kernel((96, 24), seed=11)
  codes, stats, _ = bnb.int8_vectorwise_quant(_torch_weight(kernel))
  q = quant.quantize_array(jnp.asarray(kernel), "int8", block_size=96, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy())
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), stats.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize()), bnb.int8_vectorwise_dequant(codes, stats).numpy().T)
