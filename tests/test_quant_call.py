"""jlora.quant's module-call hook: an unmodified model over a quantized base, with and without adapters.

LoRA over a quantized base is LoRA over the dequantized float base: the same values, bit for bit, because a
module's own call computes base(x) from the very kernel ``dequantize`` returns. What changes is where the float
kernel lives: inside the module's call (and again in its backward), never as a whole-model float copy.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import CASES
from flax import nnx

import jlora
import jlora.nnx
from jlora import JloraError, quant

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _random_like(tree, seed, scale=0.1):
  """Numpy values for a tree of arrays or shapes (nothing to compile); B != 0 in adapters."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: (scale * rng.standard_normal(v.shape)).astype(v.dtype), tree)


def _quantized_and_float(fn):
  """``fn(params, ...)`` on the quantized params and on their dequantized floats, in one compiled program."""
  return jax.jit(lambda q, *args: (fn(q, *args), fn(quant.dequantize(q), *args)), compiler_options=FAST)


KIND_BY_CASE = {"dense_general": ("nf4", True), "einsum_interleaved": ("fp4", True), "conv": ("int8", True),
                "vmap": ("nf4", False)}


@pytest.mark.parametrize("case", [c for c in CASES if c.name in KIND_BY_CASE], ids=lambda c: c.name)
def test_lora_over_a_quantized_base_is_lora_over_its_dequantized_base(case):
  kind, double_quant = KIND_BY_CASE[case.name]
  params = _random_like(jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)["params"], 0, 0.5)
  qparams = quant.quantize(params, case.targets, kind=kind, double_quant=double_quant)
  lora = jlora.Lora(case.model, jlora.LoraConfig(targets=case.targets, rank=2))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(1), qparams, *case.inputs), 2)
  assert jax.tree.map(np.shape, adapters) == jax.tree.map(
      np.shape, jax.eval_shape(lora.init, jax.random.key(1), params, *case.inputs))
  got, expected = _quantized_and_float(lora.apply)(qparams, adapters, *case.inputs)
  np.testing.assert_array_equal(got, expected)
  assert not np.allclose(got, lora.apply(params, adapters, *case.inputs), atol=1e-5, rtol=0)  # really quantized


class Block(nn.Module):
  @nn.compact
  def __call__(self, x_btd, _):
    h_btf = nn.Dense(128, name="up")(x_btd)
    return x_btd + nn.Dense(64, name="down")(jax.nn.gelu(h_btf)), None


class Stack(nn.Module):
  """Scanned blocks (optionally rematerialised) and an unquantized head."""

  n_layers: int = 3
  remat: bool = True

  @nn.compact
  def __call__(self, x_btd):
    block = nn.remat(Block) if self.remat else Block
    x_btd, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.n_layers)(name="layers")(x_btd, None)
    return nn.Dense(8, name="head")(x_btd)


def _stack_setup(model, kind="nf4"):
  x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(1), x)["params"], 1)
  qparams = quant.quantize(params, r"layers/.*/kernel", kind=kind)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=4))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(2), qparams, x), 3)
  return x, params, qparams, lora, adapters


def test_scan_remat_jit_and_gradients_equal_the_dequantized_path():
  x, _, qparams, lora, adapters = _stack_setup(Stack())
  assert qparams["layers"]["up"]["kernel"].codes.shape[0] == 3  # per layer, sliced by the scan

  def value_and_grad(params, adapters):
    return jax.value_and_grad(lambda a: jnp.mean(lora.apply(params, a, x) ** 2))(adapters)

  (value, grads), (ref_value, ref_grads) = _quantized_and_float(value_and_grad)(qparams, adapters)
  chex.assert_trees_all_equal((value, grads), (ref_value, ref_grads))
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # gradients are the adapters' only
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


def test_backward_keeps_no_float_kernel_per_layer():
  """Without remat, a scan's backward saves what each layer's forward made; the float kernel must not be that."""
  model = Stack(n_layers=6, remat=False)
  x = jax.ShapeDtypeStruct((2, 5, 64), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(1), x)["params"]
  qparams = jax.eval_shape(lambda p: quant.quantize(p, r"layers/.*/kernel"), params)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r"layers/.*/kernel", rank=4))
  adapters = jax.eval_shape(lora.init, jax.random.key(2), qparams, x)

  def temp_bytes(params):
    grad = jax.jit(jax.grad(lambda a, p, x: jnp.mean(lora.apply(p, a, x) ** 2)), compiler_options=FAST)
    return grad.lower(adapters, params, x).compile().memory_analysis().temp_size_in_bytes

  one_layer = 2 * 64 * 128 * 4  # float32 up + down kernels
  assert temp_bytes(qparams) < temp_bytes(params) + 2 * one_layer  # not + 6 layers' worth


def test_inference_without_adapters():
  model = Stack()
  x, _, qparams, _, _ = _stack_setup(model)
  empty = jlora.Lora(model, jlora.LoraConfig(targets=r"head/kernel", rank=2))
  outputs = _quantized_and_float(lambda p: (quant.apply(model, p, x), quant.apply_fn(model)({"params": p}, x),
                                            empty.apply(p, {}, x)))(qparams)
  expected = outputs[1][0]  # the plain model on the dequantized params
  for got in outputs[0]:
    np.testing.assert_array_equal(got, expected)


class Embedder(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Embed(128, 64, name="embed")(ids)


class OwnParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.normal(), (64, 8))


@pytest.mark.parametrize("model, inputs, path, message", [
    (Embedder(), (jnp.zeros((1, 3), jnp.int32),), "embed/embedding", r"'embed/embedding' is quantized, but Embed.*setup"),
    (OwnParam(), (jnp.ones((1, 64)),), "w", r"'/w' is quantized, but OwnParam at ''.*__call__"),
], ids=["embed", "custom_param"])
def test_a_quantized_param_no_module_can_dequantize_raises(model, inputs, path, message):
  qparams = quant.quantize(_random_like(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"], 0), path)
  with pytest.raises(JloraError, match=message):
    quant.apply(model, qparams, *inputs)


class NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(64, 128, rngs=rngs)
    self.down = nnx.Linear(128, 16, rngs=rngs)
    self.embed = nnx.Embed(10, 64, rngs=rngs)

  def __call__(self, ids):
    return self.down(jax.nn.gelu(self.up(self.embed(ids))))


def test_nnx_model_over_a_quantized_base():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))))
  model = nnx.merge(graphdef, _random_like(abstract, 5))  # numpy values: nothing to compile
  ids = np.arange(6).reshape(2, 3)
  with pytest.raises(JloraError, match="'embed/embedding' is not the kernel of an nnx.Linear"):
    quant.quantize_nnx(model, r".*/(kernel|embedding)")
  assert quant.quantize_nnx(model, r".*/kernel", kind="fp4") == ["down/kernel", "up/kernel"]
  float_twin = nnx.clone(model)  # quantized too; its kernels are dequantized where it is compared
  config = jlora.LoraConfig(targets=r".*/kernel", rank=2)
  for m in (model, float_twin):
    jlora.nnx.apply_lora(m, config, rngs=nnx.Rngs(1))
    m.up.lora_b[...] = _random_like(m.up.lora_b[...], 4)
  assert quant.is_quantized(model.up.kernel.get_value())

  (graphdef, *quantized), (float_graphdef, *floats) = (nnx.split(m, jlora.nnx.LoraParam, ...)
                                                       for m in (model, float_twin))

  @functools.partial(jax.jit, compiler_options=FAST)
  def grads(quantized, floats):  # one program: the float twin's kernels are dequantized by the same compile
    def loss(graphdef, trainable, rest):
      y = nnx.merge(graphdef, trainable, rest)(ids)
      return jnp.mean(y**2), y

    return (jax.grad(loss, argnums=1, has_aux=True)(graphdef, *quantized),
            jax.grad(loss, argnums=1, has_aux=True)(float_graphdef, floats[0], quant.dequantize(floats[1])))

  (got_grads, got), (float_grads, expected) = grads(quantized, floats)
  np.testing.assert_array_equal(got, expected)
  chex.assert_trees_all_equal(got_grads, float_grads)
  merged = jlora.nnx.merged_copy(model)
  assert not quant.is_quantized(merged.up.kernel.get_value())
  chex.assert_trees_all_close(merged(ids), got, atol=1e-5, rtol=0)
