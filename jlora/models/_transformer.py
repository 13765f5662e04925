"""The transformer core of ``jlora.models``: attention, MLP, norms and the layer, written once.

An architecture describes itself with a :class:`TransformerSpec` (sizes, switches and the Hugging Face
module names of a layer, :class:`LayerNames`) and these modules build the layer from it. What differs
between Llama, Gemma, GPT-2 and BERT is data here: RoPE or learned positions, RMSNorm or LayerNorm,
gated or plain MLP, separate or fused q/k/v, pre- or post-norm, biases, dropout rates, names.

Every weight matrix is a plain ``nn.Dense`` (kernel ``(in, out)``) or ``nn.Embed`` named after the
Hugging Face module, so parameter paths are the checkpoint's names and LoRA / quantized kernels reach
every projection through flax's method interception.
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._attention import dot_product_attention
from jlora.models._kv_cache import Slots, update_kv
from jlora.models._norms import RMSNorm
from jlora.models._rope import Llama3RopeScaling, apply_rope
from jlora.models._stacking import RematPolicy, apply_layers

RopeTables = tuple[jax.Array, jax.Array]  # (cos_bth, sin_bth) from jlora.models._rope.rope_angles


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerNames:
  """The Hugging Face module names of a model, which are its parameter paths.

  Where a layer's modules sit depends on the norm placement:

  * pre-norm (Llama, GPT-2): ``{norm_1}``, ``{attention}/{q,k,v}`` (or ``{attention}/{qkv}``) and
    ``{attention}/{o}``, ``{norm_2}``, ``{mlp}/{gate,up,down}``;
  * post-norm (BERT): ``{attention}/{heads}/{q,k,v}``, ``{attention}/{output}/{o,norm_1}``,
    ``{mlp}/{up}``, ``{output}/{down,norm_2}``: each sub-layer's output projection sits with its norm.

  Attributes:
    layers: the stack (``layers_3/...`` unrolled, ``layers/...`` with ``nn.scan``).
    attention: the attention sub-layer.
    q: query projection (with ``k`` and ``v``), or None with a fused ``qkv``.
    k: key projection.
    v: value projection.
    qkv: one fused ``[q | k | v]`` projection (GPT-2's ``c_attn``), or None.
    o: attention output projection.
    mlp: the MLP sub-layer.
    gate: gate projection of a gated MLP, None for a plain one.
    up: MLP input projection.
    down: MLP output projection.
    norm_1: norm of the attention sub-layer (before it, or after it with post-norm).
    norm_2: norm of the MLP sub-layer.
    heads: post-norm only: the module of the q/k/v projections inside ``attention``.
    output: post-norm only: the module of an output projection and its norm.
    body: decoders only: the decoder body inside the LM (``model``, ``transformer``).
    tokens: decoders only: the token embedding inside the body.
    positions: decoders with learned positions only: the position embedding inside the body.
    final_norm: decoders only: the norm after the last layer.
  """

  layers: str
  attention: str
  q: str | None = None
  k: str | None = None
  v: str | None = None
  qkv: str | None = None
  o: str
  mlp: str
  gate: str | None = None
  up: str
  down: str
  norm_1: str
  norm_2: str
  heads: str | None = None
  output: str | None = None
  body: str | None = None
  tokens: str | None = None
  positions: str | None = None
  final_norm: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerSpec:
  """Everything the core needs to build an architecture's layers (and a decoder's body).

  Architectures derive it from their Hugging Face-style config (``config.transformer``).

  Attributes:
    names: the module names.
    num_layers: number of layers.
    width: model width ``D``.
    num_heads: query heads ``N``.
    num_kv_heads: key/value heads ``K`` (grouped-query attention when ``K < N``).
    head_dim: per-head width ``H``.
    mlp_width: MLP hidden width ``F``.
    activation: MLP activation, by its Hugging Face name.
    gated_mlp: ``down(act(gate(x)) * up(x))`` instead of ``down(act(up(x)))``.
    norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm with bias).
    norm_eps: norm epsilon.
    norm_zero_centered: Gemma's RMSNorm ``(1 + w)`` convention.
    post_norm: ``h = norm(h + sublayer(h))`` (BERT) instead of ``h = h + sublayer(norm(h))``.
    qkv_bias: biases on the q/k/v projections.
    o_bias: bias on the attention output projection.
    mlp_bias: biases on the MLP projections.
    attention_scale: factor of the attention scores, usually ``H ** -0.5``.
    sliding_window: decoders only: attention window of causal attention, or None.
    rope_theta: RoPE base, or None for learned (or no) positions.
    rope_scaling: llama3 RoPE scaling, or None.
    attention_dropout: dropout on attention weights.
    residual_dropout: dropout on each sub-layer's output.
    embedding_dropout: decoders only: dropout after the embeddings.
    vocab_size: decoders only: number of tokens.
    max_positions: decoders with learned positions only: number of positions.
    embedding_scale: decoders only: factor of the token embeddings (Gemma's ``sqrt(D)``), or None.
    tie_word_embeddings: decoders only: logits from the token embedding instead of ``lm_head``.
    init_std: std of the normal initialiser of fresh weights.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.
    scan: stack layers with ``nn.scan`` (params get a leading layer axis).
    remat: rematerialisation policy of each layer.
  """

  names: LayerNames
  num_layers: int
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_width: int
  activation: str
  gated_mlp: bool
  norm: Literal["rms", "layer"]
  norm_eps: float
  norm_zero_centered: bool = False
  post_norm: bool = False
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  attention_scale: float
  sliding_window: int | None = None
  rope_theta: float | None = None
  rope_scaling: Llama3RopeScaling | None = None
  attention_dropout: float
  residual_dropout: float
  embedding_dropout: float = 0.0
  vocab_size: int | None = None
  max_positions: int | None = None
  embedding_scale: float | None = None
  tie_word_embeddings: bool = False
  init_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  scan: bool
  remat: RematPolicy

  def __post_init__(self):
    names = self.names
    if (names.qkv is None) == (names.q is None or names.k is None or names.v is None):
      raise JloraError(f"LayerNames needs q, k and v or one fused qkv, got {names}.")
    if self.gated_mlp != (names.gate is not None):
      raise JloraError(f"gated_mlp={self.gated_mlp} needs {'a' if self.gated_mlp else 'no'} gate name, got {names}.")
    if self.post_norm and (names.heads is None or names.output is None or names.qkv is not None):
      raise JloraError(f"The post-norm layout needs heads and output names and separate q/k/v, got {names}.")

  @classmethod
  def from_config(cls, config, **fields) -> "TransformerSpec":
    """A spec with the fields every ``jlora.models`` config names alike, then ``fields``.

    Those are ``initializer_range``, ``dtype``, ``param_dtype``, ``scan_layers`` and ``remat``.
    """
    return cls(init_std=config.initializer_range, dtype=config.dtype, param_dtype=config.param_dtype,
               scan=config.scan_layers, remat=config.remat, **fields)


def dense(spec: TransformerSpec, features: int, use_bias: bool, name: str | None) -> nn.Dense:
  """A projection with the spec's dtypes and initialiser."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=spec.dtype,
      param_dtype=spec.param_dtype,
      kernel_init=nn.initializers.normal(spec.init_std),
      name=name,
  )


def embed(spec: TransformerSpec, num_embeddings: int, name: str | None) -> nn.Embed:
  """An embedding table of width ``D`` with the spec's dtypes and initialiser."""
  return nn.Embed(
      num_embeddings,
      spec.width,
      dtype=spec.dtype,
      param_dtype=spec.param_dtype,
      embedding_init=nn.initializers.normal(spec.init_std),
      name=name,
  )


def norm(spec: TransformerSpec, name: str | None) -> nn.Module:
  """The spec's norm: RMSNorm (float32 statistics) or LayerNorm (exact two-pass variance, as torch)."""
  if spec.norm == "rms":
    return RMSNorm(
        epsilon=spec.norm_eps,
        zero_centered=spec.norm_zero_centered,
        dtype=spec.dtype,
        param_dtype=spec.param_dtype,
        name=name,
    )
  return nn.LayerNorm(
      epsilon=spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype, use_fast_variance=False, name=name
  )


class Attention(nn.Module):
  """Self-attention: q/k/v projections (separate or fused), RoPE, KV cache, GQA attention, output projection.

  With ``output=False`` it returns the attended heads merged to ``(B, T, N * H)`` and leaves the output
  projection to :class:`PostNormOutput` (the post-norm layout).
  """

  spec: TransformerSpec
  output: bool = True

  @nn.compact
  def __call__(
      self,
      x_btd: jax.Array,
      mask_bts: jax.Array,
      rope: RopeTables | None,
      slots: Slots | None,
      *,
      decode: bool,
      deterministic: bool,
  ) -> jax.Array:
    s, names = self.spec, self.spec.names
    batch, length, _ = x_btd.shape
    q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    if names.qkv is not None:
      qkv_btf = dense(s, q_width + 2 * kv_width, s.qkv_bias, names.qkv)(x_btd)
      q_btf, k_btf, v_btf = jnp.split(qkv_btf, [q_width, q_width + kv_width], axis=-1)
    else:
      q_btf = dense(s, q_width, s.qkv_bias, names.q)(x_btd)
      k_btf = dense(s, kv_width, s.qkv_bias, names.k)(x_btd)
      v_btf = dense(s, kv_width, s.qkv_bias, names.v)(x_btd)
    q_btnh = q_btf.reshape(batch, length, s.num_heads, s.head_dim)
    k_btkh = k_btf.reshape(batch, length, s.num_kv_heads, s.head_dim)
    v_btkh = v_btf.reshape(batch, length, s.num_kv_heads, s.head_dim)
    if rope is not None:
      q_btnh = apply_rope(q_btnh, *rope)
      k_btkh = apply_rope(k_btkh, *rope)
    k_bskh, v_bskh = update_kv(self, k_btkh, v_btkh, slots, decode=decode)
    out_btnh = dot_product_attention(
        q_btnh,
        k_bskh,
        v_bskh,
        mask_bts,
        scale=s.attention_scale,
        dropout=nn.Dropout(s.attention_dropout, deterministic=deterministic),
    )
    out_btf = out_btnh.reshape(batch, length, q_width)
    if not self.output:
      return out_btf
    out_btd = dense(s, s.width, s.o_bias, names.o)(out_btf)
    return nn.Dropout(s.residual_dropout, deterministic=deterministic)(out_btd)


class MLP(nn.Module):
  """``down(act(gate(x)) * up(x))`` (gated: SwiGLU, GeGLU) or ``down(act(up(x)))``.

  With ``output=False`` it returns the hidden activations and leaves ``down`` to :class:`PostNormOutput`.
  """

  spec: TransformerSpec
  output: bool = True

  @nn.compact
  def __call__(self, x_btd: jax.Array, *, deterministic: bool) -> jax.Array:
    s, names = self.spec, self.spec.names
    act = activation(s.activation)
    if s.gated_mlp:
      hidden_btf = act(dense(s, s.mlp_width, s.mlp_bias, names.gate)(x_btd)) * dense(
          s, s.mlp_width, s.mlp_bias, names.up
      )(x_btd)
    else:
      hidden_btf = act(dense(s, s.mlp_width, s.mlp_bias, names.up)(x_btd))
    if not self.output:
      return hidden_btf
    out_btd = dense(s, s.width, s.mlp_bias, names.down)(hidden_btf)
    return nn.Dropout(s.residual_dropout, deterministic=deterministic)(out_btd)


class PostNormOutput(nn.Module):
  """The end of a post-norm sub-layer: ``norm(dropout(projection(x)) + residual)``.

  Attributes:
    spec: the spec.
    projection: name of the output projection.
    norm: name of the norm.
    use_bias: bias on the projection.
  """

  spec: TransformerSpec
  projection: str
  norm: str
  use_bias: bool

  @nn.compact
  def __call__(self, x_btf: jax.Array, residual_btd: jax.Array, *, deterministic: bool) -> jax.Array:
    s = self.spec
    h_btd = dense(s, s.width, self.use_bias, self.projection)(x_btf)
    h_btd = nn.Dropout(s.residual_dropout, deterministic=deterministic)(h_btd)
    return norm(s, self.norm)(h_btd + residual_btd)


class PostNormAttention(nn.Module):
  """The post-norm attention sub-layer: ``{heads}`` (attention) then ``{output}`` (projection and norm)."""

  spec: TransformerSpec

  @nn.compact
  def __call__(
      self, h_btd: jax.Array, mask_bts: jax.Array, rope: RopeTables | None, slots: Slots | None, *,
      decode: bool, deterministic: bool,
  ) -> jax.Array:
    s, names = self.spec, self.spec.names
    attended_btf = Attention(s, output=False, name=names.heads)(
        h_btd, mask_bts, rope, slots, decode=decode, deterministic=deterministic
    )
    output = PostNormOutput(s, names.o, names.norm_1, s.o_bias, name=names.output)
    return output(attended_btf, h_btd, deterministic=deterministic)


class Block(nn.Module):
  """One layer: ``h += attn(norm_1(h)); h += mlp(norm_2(h))``, or post-norm ``h = norm_1(h + attn(h)); ...``.

  Called by :func:`apply_blocks` (``nn.scan`` or a loop), hence the ``(carry, None)`` return.
  """

  spec: TransformerSpec
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(
      self, h_btd: jax.Array, mask_bts: jax.Array, rope: RopeTables | None, slots: Slots | None
  ) -> tuple[jax.Array, None]:
    s, names = self.spec, self.spec.names
    flags = {"decode": self.decode, "deterministic": self.deterministic}
    if s.post_norm:
      h_btd = PostNormAttention(s, name=names.attention)(h_btd, mask_bts, rope, slots, **flags)
      hidden_btf = MLP(s, output=False, name=names.mlp)(h_btd, deterministic=self.deterministic)
      output = PostNormOutput(s, names.down, names.norm_2, s.mlp_bias, name=names.output)
      return output(hidden_btf, h_btd, deterministic=self.deterministic), None
    attention = Attention(s, name=names.attention)
    h_btd = h_btd + attention(norm(s, names.norm_1)(h_btd), mask_bts, rope, slots, **flags)
    h_btd = h_btd + MLP(s, name=names.mlp)(norm(s, names.norm_2)(h_btd), deterministic=self.deterministic)
    return h_btd, None


def apply_blocks(
    spec: TransformerSpec,
    h_btd: jax.Array,
    mask_bts: jax.Array,
    rope: RopeTables | None,
    slots: Slots | None,
    *,
    decode: bool,
    deterministic: bool,
) -> jax.Array:
  """Runs the spec's ``num_layers`` layers (``names.layers``) on ``h``; call from a compact method.

  Args:
    spec: the spec.
    h_btd: hidden states ``(B, T, D)``.
    mask_bts: bool attention mask ``(B, T, S)``.
    rope: ``(cos_bth, sin_bth)`` with RoPE, else None.
    slots: where the tokens sit in the KV cache (``sequence_slots``); None without a cache.
    decode: read and append to the KV cache.
    deterministic: disable dropout.

  Returns:
    The hidden states after the last layer.
  """
  return apply_layers(
      Block,
      h_btd,
      mask_bts,
      rope,
      slots,
      num_layers=spec.num_layers,
      scan=spec.scan,
      remat=spec.remat,
      name=spec.names.layers,
      spec=spec,
      decode=decode,
      deterministic=deterministic,
  )
