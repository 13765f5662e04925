"""jlora.quant.quantize / dequantize over params trees: targets, stacked layers, bytes, checkpoints."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jlora import JloraError, quant


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "layers": {"mlp": {"kernel": rng.standard_normal((3, 256, 64)).astype(np.float32),  # 3 stacked layers
                         "bias": np.zeros((3, 64), np.float32)}},
      "head": {"kernel": rng.standard_normal((48, 10)).astype(np.float32),  # in 48: flat layout
               "bias": np.zeros(10, np.float32)},
  }


def test_targets_by_regex_and_stacked_layers_quantized_per_layer():
  params = _params()
  qparams = quant.quantize(params, [r"layers/.*/kernel", r"head/kernel"], kind="fp4")
  assert qparams["layers"]["mlp"]["bias"] is params["layers"]["mlp"]["bias"]  # untargeted leaves are shared
  stacked = qparams["layers"]["mlp"]["kernel"]
  assert stacked.shape == (3, 256, 64) and stacked.dtype == jnp.float32 and stacked.rows
  assert stacked.codes.shape == (3, 64, 128) and stacked.absmax.shape == (3, 64, 4)
  assert stacked.absmax_scale.shape == (3, 1) and stacked.absmax_offset.shape == (3,)
  for layer in range(3):  # each layer is quantized on its own, as bitsandbytes would quantize that layer
    alone = quant.quantize_array(params["layers"]["mlp"]["kernel"][layer], "fp4")
    chex.assert_trees_all_equal(jax.tree.map(lambda leaf, layer=layer: leaf[layer], stacked), alone)
  head = qparams["head"]["kernel"]
  assert not head.rows and head.codes.shape == (240,) and head.absmax.shape == (8,)  # 480 = 7.5 blocks
  dense = quant.dequantize(qparams)
  assert jax.tree.structure(dense) == jax.tree.structure(params)
  assert not any(quant.is_quantized(x) for x in jax.tree.leaves(dense, is_leaf=quant.is_quantized))
  assert quant.logical_shapes(qparams)["head"]["kernel"] == jax.ShapeDtypeStruct((48, 10), jnp.float32)
  error = np.abs(np.asarray(dense["layers"]["mlp"]["kernel"]) - params["layers"]["mlp"]["kernel"])
  assert 0 < error.max() < 0.15 * np.abs(params["layers"]["mlp"]["kernel"]).max()


@pytest.mark.parametrize("targets, kwargs, message", [
    (r"layers/.*/kernal", {}, r"rule 'layers/\.\*/kernal' matches no parameter path.*Near misses: \['layers/mlp/kernel'"),
    (r"head/.*", {}, r"'head/bias': .*rank >= 2"),
    (r"head/kernel", {"kind": "nf2"}, r"Unknown quantization kind 'nf2'"),
    (r"head/kernel", {"block_size": 63}, r"block_size must be even"),
    ([], {}, r"targets is empty"),
], ids=["no_match", "bias", "kind", "odd_block", "empty"])
def test_quantize_refuses(targets, kwargs, message):
  with pytest.raises(JloraError, match=message):
    quant.quantize(_params(), targets, **kwargs)


def test_quantize_refuses_quantized_and_non_finite_kernels():
  qparams = quant.quantize(_params(), r"head/kernel", double_quant=False)
  with pytest.raises(JloraError, match="'head/kernel' is quantized already"):
    quant.quantize(qparams, r"head/kernel")
  params = _params()
  params["head"]["kernel"][3, 4] = np.nan
  with pytest.raises(JloraError, match=r"'head/kernel': .*NaN or inf"):
    quant.quantize(params, r"head/kernel", double_quant=False)


def test_bytes_per_parameter():
  kernel = {"w": np.ones((1024, 512), np.float32)}  # large enough that per-matrix constants do not matter
  double = quant.footprint(quant.quantize(kernel, "w"))
  assert double.quantized_params == 1024 * 512 and double.other_params == 0
  assert double.bytes_per_param <= 0.52  # 4 + 8/64 + 32/(64*256) bits = 4.127 bits
  assert double.quantized_bytes == sum(leaf.nbytes for leaf in jax.tree.leaves(quant.quantize(kernel, "w")))
  assert quant.footprint(quant.quantize(kernel, "w", double_quant=False)).bytes_per_param == 0.5 + 4 / 64
  assert quant.footprint(quant.quantize(kernel, "w", kind="int8")).bytes_per_param < 1.02


def test_orbax_round_trip_is_bitwise_and_restores_onto_the_abstract_quantized_tree(tmp_path):
  params = _params()
  qparams = quant.quantize(params, [r"layers/.*/kernel", r"head/kernel"])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "base", qparams)
  # Quantize once, reuse: the restore target is quantize() traced on the base's shapes.
  abstract = jax.eval_shape(lambda p: quant.quantize(p, [r"layers/.*/kernel", r"head/kernel"]), params)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "base", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(qparams)  # format (static fields) included
  chex.assert_trees_all_equal(restored, qparams)
  chex.assert_trees_all_equal_dtypes(restored, qparams)
