"""A flax.nnx Llama decoder of the benchmarked shapes, with a pluggable projection layer.

The nnx comparison needs one model written once and built twice: with flax's own ``nnx.LoRALinear``
for the seven projections, and with plain ``nnx.Linear`` that ``jlora.nnx.apply_lora`` then adapts.
Everything but the projections (embedding, RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, untied ``lm_head``) is the same code in both, and the attention and rotary maths are
``jlora.models``' own functions, so the model computes what ``LlamaForCausalLM`` computes with its
layers unrolled.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models import LlamaConfig
from jlora.models._attention import attention_mask, dot_product_attention
from jlora.models._rope import apply_rope, inverse_frequencies, rope_angles

# (in_features, out_features, rngs) -> a bias-free projection module.
Projection = Callable[[int, int, nnx.Rngs], nnx.Module]


def plain_projection(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Module:
  """An ``nnx.Linear`` without bias (for full fine-tuning or for ``jlora.nnx`` to adapt)."""
  return nnx.Linear(in_features, out_features, use_bias=False, rngs=rngs)


def flax_lora_projection(rank: int) -> Projection:
  """Projections that are flax's ``nnx.LoRALinear`` of the given rank (``A`` he-uniform, ``B`` zero)."""

  def make(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Module:
    return nnx.LoRALinear(in_features, out_features, lora_rank=rank, use_bias=False, rngs=rngs)

  return make


class _Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, projection: Projection, rngs: nnx.Rngs):
    d, head_dim = config.hidden_size, config.head_dim
    self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
    self.q_proj = projection(d, self.heads * head_dim, rngs)
    self.k_proj = projection(d, self.kv_heads * head_dim, rngs)
    self.v_proj = projection(d, self.kv_heads * head_dim, rngs)
    self.o_proj = projection(self.heads * head_dim, d, rngs)

  def __call__(self, x_btd: jax.Array, mask_bts: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    batch, length, _ = x_btd.shape
    q_btnh = self.q_proj(x_btd).reshape(batch, length, self.heads, self.head_dim)
    k_btkh = self.k_proj(x_btd).reshape(batch, length, self.kv_heads, self.head_dim)
    v_btkh = self.v_proj(x_btd).reshape(batch, length, self.kv_heads, self.head_dim)
    q_btnh, k_btkh = apply_rope(q_btnh, cos_bth, sin_bth), apply_rope(k_btkh, cos_bth, sin_bth)
    out_btnh = dot_product_attention(q_btnh, k_btkh, v_btkh, mask_bts, scale=self.head_dim**-0.5)
    return self.o_proj(out_btnh.reshape(batch, length, self.heads * self.head_dim))


class _Mlp(nnx.Module):

  def __init__(self, config: LlamaConfig, projection: Projection, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = projection(d, f, rngs)
    self.up_proj = projection(d, f, rngs)
    self.down_proj = projection(f, d, rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class _Layer(nnx.Module):

  def __init__(self, config: LlamaConfig, projection: Projection, rngs: nnx.Rngs):
    d, eps = config.hidden_size, config.rms_norm_eps
    self.input_layernorm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
    self.self_attn = _Attention(config, projection, rngs)
    self.post_attention_layernorm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
    self.mlp = _Mlp(config, projection, rngs)

  def __call__(self, h_btd, mask_bts, cos_bth, sin_bth):
    h_btd = h_btd + self.self_attn(self.input_layernorm(h_btd), mask_bts, cos_bth, sin_bth)
    return h_btd + self.mlp(self.post_attention_layernorm(h_btd))


class NnxLlama(nnx.Module):
  """A Llama causal LM in flax.nnx: token ids ``(B, T)`` to logits ``(B, T, vocab)``, no padding, no cache.

  Args:
    config: the shape (biases, RoPE scaling, sliding windows and Gemma switches are not modelled).
    projection: builds each of the seven per-layer projections; ``lm_head`` is always plain.
    rngs: initialisation rngs.
  """

  def __init__(self, config: LlamaConfig, *, projection: Projection, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.layers = nnx.List([_Layer(config, projection, rngs) for _ in range(config.num_hidden_layers)])
    self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)
    self.lm_head = plain_projection(config.hidden_size, config.vocab_size, rngs)
    self.head_dim, self.rope_theta = config.head_dim, config.rope_theta

  def __call__(self, ids_bt: jax.Array) -> jax.Array:
    batch, length = ids_bt.shape
    positions_bt = jnp.broadcast_to(jnp.arange(length), (batch, length))
    inv_freq = inverse_frequencies(self.head_dim, self.rope_theta)
    cos_bth, sin_bth = rope_angles(positions_bt, inv_freq, jnp.float32)
    mask_bts = attention_mask(jnp.ones((batch, length), bool), jnp.arange(length), causal=True)
    h_btd = self.embed_tokens(ids_bt)
    for layer in self.layers:
      h_btd = layer(h_btd, mask_bts, cos_bth, sin_bth)
    return self.lm_head(self.norm(h_btd))
