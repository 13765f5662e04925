"""The Llama family of decoders: Llama 2/3, Mistral, Qwen2/2.5 and Gemma, one module with config switches.

Parameter paths follow the Hugging Face module names, e.g. ``model/layers/self_attn/q_proj/kernel``
(``nn.scan``-ned layers, leading layer axis) or ``model/layers_0/self_attn/q_proj/kernel`` (unrolled).
Every weight matrix is a plain ``nn.Dense`` / ``nn.Embed`` with kernels laid out ``(in, out)``.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._attention import attention_mask as make_attention_mask
from jlora.models._attention import dot_product_attention
from jlora.models._kv_cache import Slots, default_position_ids, sequence_slots, update_kv
from jlora.models._norms import RMSNorm
from jlora.models._rope import Llama3RopeScaling, apply_rope, inverse_frequencies, rope_angles
from jlora.models._stacking import RematPolicy, apply_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family decoder; field names follow Hugging Face configs.

  The family members differ only by switches: Llama (defaults), Mistral (``sliding_window``),
  Qwen2 (``qkv_bias=True``), Gemma (``norm_zero_centered``, ``scale_embeddings``,
  ``hidden_act="gelu_pytorch_tanh"``, ``tie_word_embeddings``, explicit ``head_dim``).

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``D``.
    intermediate_size: width of the gated MLP.
    num_hidden_layers: number of decoder layers.
    num_attention_heads: query heads ``N``.
    num_key_value_heads: key/value heads ``K`` (grouped-query attention); None means ``N``.
    head_dim: per-head width ``H``; None means ``D // N``.
    max_position_embeddings: context length the model was trained for (informational).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: llama3 RoPE scaling, or None.
    qkv_bias: biases on ``q_proj``, ``k_proj``, ``v_proj`` (Qwen2; Llama's ``attention_bias``).
    o_bias: bias on ``o_proj`` (Llama's ``attention_bias``).
    mlp_bias: biases on the MLP projections (Llama's ``mlp_bias``).
    hidden_act: MLP gate activation: ``"silu"`` (SwiGLU) or ``"gelu_pytorch_tanh"`` (GeGLU).
    tie_word_embeddings: logits from ``embed_tokens.attend`` instead of a separate ``lm_head``.
    norm_zero_centered: Gemma's RMSNorm ``(1 + w)`` convention.
    scale_embeddings: Gemma's embedding scaling by ``sqrt(hidden_size)`` (in the compute dtype).
    sliding_window: Mistral's attention window, or None for full causal attention.
    attention_dropout: dropout rate on attention weights (active with ``deterministic=False``).
    initializer_range: std of the normal initialiser of fresh weights.
    model_type: Hugging Face ``model_type`` written by ``save_pretrained``.
    bos_token_id: beginning-of-sequence token(s), kept for ``save_pretrained``.
    eos_token_id: end-of-sequence token(s), kept for ``save_pretrained`` and generation.
    pad_token_id: padding token, kept for ``save_pretrained``.
    dtype: compute dtype (activations, KV cache, logits).
    param_dtype: dtype of the parameters.
    scan_layers: stack layers with ``nn.scan`` (params get a leading layer axis).
    remat: rematerialisation policy of each layer: "none", "full", "dots" or "dots_no_batch".

  Example:
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> config.head_dim, config.num_key_value_heads
    (4, 2)
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  norm_zero_centered: bool = False
  scale_embeddings: bool = False
  sliding_window: int | None = None
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  model_type: str = "llama"
  bos_token_id: int | tuple[int, ...] | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  remat: RematPolicy = "none"

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise JloraError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})."
      )
    if self.head_dim % 2:
      raise JloraError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
    activation(self.hidden_act)  # fail on an unknown activation now rather than at the first call


def _dense(config: LlamaConfig, features: int, use_bias: bool, name: str | None) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
  )


def _rms_norm(config: LlamaConfig, name: str | None = None) -> RMSNorm:
  return RMSNorm(
      epsilon=config.rms_norm_eps,
      zero_centered=config.norm_zero_centered,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      name=name,
  )


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

  config: LlamaConfig

  @nn.compact
  def __call__(
      self,
      x_btd: jax.Array,
      mask_bts: jax.Array,
      cos_bth: jax.Array,
      sin_bth: jax.Array,
      slots: Slots,
      *,
      decode: bool,
      deterministic: bool,
  ) -> jax.Array:
    cfg = self.config
    batch, length, _ = x_btd.shape
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_btnh = _dense(cfg, heads * head_dim, cfg.qkv_bias, "q_proj")(x_btd).reshape(batch, length, heads, head_dim)
    k_btkh = _dense(cfg, kv_heads * head_dim, cfg.qkv_bias, "k_proj")(x_btd).reshape(batch, length, kv_heads, head_dim)
    v_btkh = _dense(cfg, kv_heads * head_dim, cfg.qkv_bias, "v_proj")(x_btd).reshape(batch, length, kv_heads, head_dim)
    q_btnh = apply_rope(q_btnh, cos_bth, sin_bth)
    k_btkh = apply_rope(k_btkh, cos_bth, sin_bth)
    k_bskh, v_bskh = update_kv(self, k_btkh, v_btkh, slots, decode=decode)
    out_btnh = dot_product_attention(
        q_btnh,
        k_bskh,
        v_bskh,
        mask_bts,
        scale=head_dim**-0.5,
        dropout=nn.Dropout(cfg.attention_dropout, deterministic=deterministic),
    )
    return _dense(cfg, cfg.hidden_size, cfg.o_bias, "o_proj")(out_btnh.reshape(batch, length, heads * head_dim))


class LlamaMLP(nn.Module):
  """Gated MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU / GeGLU)."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg = self.config
    gate_btf = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x_btd)
    up_btf = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x_btd)
    hidden_btf = activation(cfg.hidden_act)(gate_btf) * up_btf
    return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(hidden_btf)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm decoder layer: ``h += attn(norm(h)); h += mlp(norm(h))``."""

  config: LlamaConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(
      self, h_btd: jax.Array, mask_bts: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array, slots: Slots
  ) -> tuple[jax.Array, None]:
    cfg = self.config
    attn = LlamaAttention(cfg, name="self_attn")
    h_btd = h_btd + attn(
        _rms_norm(cfg, "input_layernorm")(h_btd),
        mask_bts,
        cos_bth,
        sin_bth,
        slots,
        decode=self.decode,
        deterministic=self.deterministic,
    )
    h_btd = h_btd + LlamaMLP(cfg, name="mlp")(_rms_norm(cfg, "post_attention_layernorm")(h_btd))
    return h_btd, None


class LlamaModel(nn.Module):
  """The decoder body (HF ``LlamaModel``): embeddings, layers and final norm; returns hidden states."""

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(cfg.initializer_range),
    )
    self.norm = _rms_norm(cfg)

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    cfg = self.config
    if segment_ids is not None:
      if decode:
        raise ValueError("segment_ids (packed rows) cannot be combined with decode=True.")
      if position_ids is None:
        raise ValueError("segment_ids (packed rows) need explicit position_ids that restart in each segment.")
      if attention_mask is None:
        attention_mask = (segment_ids > 0).astype(jnp.int32)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    slots = sequence_slots(self, attention_mask, decode=decode)
    if position_ids is None:
      position_ids = default_position_ids(slots)
    h_btd = self.embed_tokens(input_ids)
    if cfg.scale_embeddings:
      h_btd = h_btd * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos_bth, sin_bth = rope_angles(position_ids, inv_freq, cfg.dtype)
    mask_bts = make_attention_mask(
        slots.key_valid_bs, slots.query_slots_t, causal=True, sliding_window=cfg.sliding_window
    )
    if segment_ids is not None:  # packed rows: a token sees only earlier tokens of its own example
      mask_bts &= segment_ids[:, :, None] == segment_ids[:, None, :]
    h_btd = apply_layers(
        LlamaDecoderLayer,
        h_btd,
        mask_bts,
        cos_bth,
        sin_bth,
        slots,
        num_layers=cfg.num_hidden_layers,
        scan=cfg.scan_layers,
        remat=cfg.remat,
        name="layers",
        config=cfg,
        decode=decode,
        deterministic=deterministic,
    )
    return self.norm(h_btd)


class LlamaForCausalLM(nn.Module):
  """A Llama-family causal LM (HF ``*ForCausalLM``): ``apply`` maps token ids to logits.

  ``model.apply({"params": params}, input_ids, attention_mask=None, position_ids=None)`` returns
  logits of shape ``(B, T, vocab_size)`` in the compute dtype. ``attention_mask`` (1 = token,
  0 = padding) handles left-padded batches; position ids default to ``cumsum(mask) - 1``. With
  ``decode=True`` and a ``"cache"`` collection from ``init_cache`` (``mutable=["cache"]``) the
  call appends to the KV cache.

  Attributes:
    config: the hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> ids = jnp.array([[3, 1, 4, 1]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> params["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape  # (layers, in, out)
    (2, 16, 8)
    >>> model.apply({"params": params}, ids).shape
    (1, 4, 32)
  """

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.model = LlamaModel(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, False, None)

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` of token ids ``(B, T)``.

    Args:
      input_ids: int token ids, shape ``(B, T)``.
      attention_mask: 1 for tokens, 0 for padding, shape ``(B, T)``; None means no padding.
      position_ids: int positions ``(B, T)``; None derives them from the mask (and cache).
      segment_ids: for packed rows, ``(B, T)`` example ids (0 = padding): attention stays within an
        example. Needs ``position_ids`` that restart per example; not with ``decode``.
      decode: read and append to the KV cache (needs a ``"cache"`` collection, mutable).
      deterministic: disable dropout; with False a ``"dropout"`` rng is needed.

    Returns:
      Logits of shape ``(B, T, vocab_size)`` in the compute dtype.
    """
    h_btd = self.model(
        input_ids, attention_mask, position_ids, segment_ids, decode=decode, deterministic=deterministic
    )
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(h_btd)
    return self.lm_head(h_btd)
