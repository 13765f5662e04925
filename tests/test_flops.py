"""LoRA never materialises W + s*A@B and never computes frozen-kernel gradients: proven by XLA FLOPs.

Per linear layer with F = 2*T*d_in*d_out forward FLOPs, full fine-tuning's train step costs 3F
(forward, input gradient, weight gradient); LoRA costs 2F + 3L with L = 2*T*r*(d_in + d_out) for the
rank-r path (its forward, input gradient and A/B gradients). With all linear layers targeted, r=8,
T=512, d=512, MLP hidden 2048, 4 stacked blocks, matmul-level theory gives 2/3 + L/F = 0.686 for
MLP-only blocks and 0.734 with attention (whose QK^T and PV matmuls have no weights to skip);
elementwise work (GELU, residuals) adds a little on top. A materialising implementation would cost
about as much as full fine-tuning (ratio ~1.0). XLA counts a scan body once, equally in both steps.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jlora

D, HIDDEN, T, RANK, LAYERS, HEADS = 512, 2048, 512, 8, 4, 8


class Block(nn.Module):
  attention: bool

  @nn.compact
  def __call__(self, x, _):
    if self.attention:
      q, k, v = (nn.Dense(D, name=n)(x).reshape(x.shape[:-1] + (HEADS, D // HEADS)) for n in ("q", "k", "v"))
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D / HEADS)
      attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(x.shape)
      x = x + nn.Dense(D, name="o")(attn)
    return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(HIDDEN, name="up")(x))), None


class Stack(nn.Module):
  attention: bool

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
    return blocks(self.attention, name="blocks")(x, None)[0]


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def _ratio(attention: bool) -> float:
  model = Stack(attention)
  x = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=RANK))
  adapters = jax.eval_shape(lambda: lora.init(jax.random.key(1), params, x))

  def full_step(params, x):
    grads = jax.grad(lambda p: jnp.sum(jnp.square(model.apply({"params": p}, x))))(params)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  def lora_step(adapters, params, x):
    grads = jax.grad(lambda a: jnp.sum(jnp.square(lora.apply(params, a, x))))(adapters)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, adapters, grads)

  return _flops(lora_step, adapters, params, x) / _flops(full_step, params, x)


@pytest.mark.parametrize("attention, limit", [(False, 0.69), (True, 0.745)])
def test_lora_train_step_flop_ratio(attention, limit):
  ratio = _ratio(attention)
  print(f"attention={attention}: LoRA/full train-step FLOPs = {ratio:.4f} (limit {limit})")
  assert 0.6 < ratio <= limit
