"""GPT-2: learned positions, LayerNorm, fused ``c_attn`` projection, tied LM head.

Parameter paths follow the Hugging Face module names, e.g. ``transformer/h/attn/c_attn/kernel``
(``nn.scan``-ned layers, leading layer axis) or ``transformer/h_0/attn/c_attn/kernel`` (unrolled).
GPT-2's ``Conv1D`` weights are already laid out ``(in, out)``, so they are the ``nn.Dense`` kernels
as they are.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._attention import attention_mask as make_attention_mask
from jlora.models._attention import dot_product_attention
from jlora.models._kv_cache import Slots, default_position_ids, sequence_slots, update_kv
from jlora.models._stacking import RematPolicy, apply_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
  """Hyper-parameters of GPT-2; field names follow Hugging Face's ``GPT2Config``.

  Attributes:
    vocab_size: number of tokens.
    n_positions: number of learned positions.
    n_embd: model width ``D``.
    n_layer: number of blocks.
    n_head: attention heads.
    n_inner: MLP width; None means ``4 * n_embd``.
    activation_function: MLP activation (``"gelu_new"`` is the tanh approximation).
    layer_norm_epsilon: LayerNorm epsilon.
    scale_attn_weights: scale attention scores by ``head_dim ** -0.5``.
    tie_word_embeddings: logits from ``wte.attend`` instead of a separate ``lm_head``.
    embd_pdrop: dropout after the embeddings (active with ``deterministic=False``).
    attn_pdrop: dropout on attention weights.
    resid_pdrop: dropout on the attention and MLP outputs.
    initializer_range: std of the normal initialiser of fresh weights.
    bos_token_id: kept for ``save_pretrained``.
    eos_token_id: kept for ``save_pretrained`` and generation.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.
    scan_layers: stack blocks with ``nn.scan`` (params get a leading layer axis).
    remat: rematerialisation policy of each block: "none", "full", "dots" or "dots_no_batch".
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  tie_word_embeddings: bool = True
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  initializer_range: float = 0.02
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  remat: RematPolicy = "none"

  def __post_init__(self):
    if self.n_inner is None:
      object.__setattr__(self, "n_inner", 4 * self.n_embd)
    if self.n_embd % self.n_head:
      raise JloraError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).")
    activation(self.activation_function)


def _dense(config: GPT2Config, features: int, name: str | None) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
  )


def _layer_norm(config: GPT2Config, name: str | None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      use_fast_variance=False,
      name=name,
  )


class GPT2Attention(nn.Module):
  """Causal self-attention with the fused ``c_attn`` (q, k, v) projection and an optional KV cache."""

  config: GPT2Config

  @nn.compact
  def __call__(
      self, x_btd: jax.Array, mask_bts: jax.Array, slots: Slots, *, decode: bool, deterministic: bool
  ) -> jax.Array:
    cfg = self.config
    batch, length, width = x_btd.shape
    heads, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
    qkv_btd = _dense(cfg, 3 * width, "c_attn")(x_btd)
    q_btnh, k_btnh, v_btnh = (
        y.reshape(batch, length, heads, head_dim) for y in jnp.split(qkv_btd, 3, axis=-1)
    )
    k_bsnh, v_bsnh = update_kv(self, k_btnh, v_btnh, slots, decode=decode)
    out_btnh = dot_product_attention(
        q_btnh,
        k_bsnh,
        v_bsnh,
        mask_bts,
        scale=head_dim**-0.5 if cfg.scale_attn_weights else 1.0,
        dropout=nn.Dropout(cfg.attn_pdrop, deterministic=deterministic),
    )
    out_btd = _dense(cfg, width, "c_proj")(out_btnh.reshape(batch, length, width))
    return nn.Dropout(cfg.resid_pdrop, deterministic=deterministic)(out_btd)


class GPT2MLP(nn.Module):
  """``c_proj(act(c_fc(x)))``."""

  config: GPT2Config

  @nn.compact
  def __call__(self, x_btd: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg = self.config
    hidden_btf = activation(cfg.activation_function)(_dense(cfg, cfg.n_inner, "c_fc")(x_btd))
    out_btd = _dense(cfg, cfg.n_embd, "c_proj")(hidden_btf)
    return nn.Dropout(cfg.resid_pdrop, deterministic=deterministic)(out_btd)


class GPT2Block(nn.Module):
  """Pre-norm block: ``h += attn(ln_1(h)); h += mlp(ln_2(h))``."""

  config: GPT2Config
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, h_btd: jax.Array, mask_bts: jax.Array, slots: Slots) -> tuple[jax.Array, None]:
    cfg = self.config
    attn = GPT2Attention(cfg, name="attn")
    h_btd = h_btd + attn(
        _layer_norm(cfg, "ln_1")(h_btd), mask_bts, slots, decode=self.decode, deterministic=self.deterministic
    )
    mlp = GPT2MLP(cfg, name="mlp")
    h_btd = h_btd + mlp(_layer_norm(cfg, "ln_2")(h_btd), deterministic=self.deterministic)
    return h_btd, None


class GPT2Model(nn.Module):
  """The GPT-2 body (HF ``GPT2Model``): token + position embeddings, blocks, final LayerNorm."""

  config: GPT2Config

  def setup(self):
    cfg = self.config
    embed_init = nn.initializers.normal(cfg.initializer_range)
    self.wte = nn.Embed(
        cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=embed_init
    )
    self.wpe = nn.Embed(
        cfg.n_positions, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=embed_init
    )
    self.ln_f = _layer_norm(cfg, None)

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    slots = sequence_slots(self, attention_mask, decode=decode)
    if position_ids is None:
      position_ids = default_position_ids(slots)
    h_btd = self.wte(input_ids) + self.wpe(position_ids)
    h_btd = nn.Dropout(cfg.embd_pdrop, deterministic=deterministic)(h_btd)
    mask_bts = make_attention_mask(slots.key_valid_bs, slots.query_slots_t, causal=True)
    h_btd = apply_layers(
        GPT2Block,
        h_btd,
        mask_bts,
        slots,
        num_layers=cfg.n_layer,
        scan=cfg.scan_layers,
        remat=cfg.remat,
        name="h",
        config=cfg,
        decode=decode,
        deterministic=deterministic,
    )
    return self.ln_f(h_btd)


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with its LM head (HF ``GPT2LMHeadModel``): ``apply`` maps token ids to logits.

  Same calling convention as :class:`jlora.models.LlamaForCausalLM`.

  Attributes:
    config: the hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2,
    ...                                    n_head=2))
    >>> ids = jnp.array([[3, 1, 4, 1]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> params["transformer"]["h"]["attn"]["c_attn"]["kernel"].shape  # (layers, in, 3 * out)
    (2, 16, 48)
    >>> model.apply({"params": params}, ids).shape
    (1, 4, 32)
  """

  config: GPT2Config

  def setup(self):
    self.transformer = GPT2Model(self.config)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(
          self.config.vocab_size,
          use_bias=False,
          dtype=self.config.dtype,
          param_dtype=self.config.param_dtype,
          kernel_init=nn.initializers.normal(self.config.initializer_range),
      )

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` of token ids ``(B, T)``.

    Args:
      input_ids: int token ids, shape ``(B, T)``.
      attention_mask: 1 for tokens, 0 for padding, shape ``(B, T)``; None means no padding.
      position_ids: int positions ``(B, T)``; None derives them from the mask (and cache).
      decode: read and append to the KV cache (needs a ``"cache"`` collection, mutable).
      deterministic: disable dropout; with False a ``"dropout"`` rng is needed.

    Returns:
      Logits of shape ``(B, T, vocab_size)`` in the compute dtype.
    """
    h_btd = self.transformer(
        input_ids, attention_mask, position_ids, decode=decode, deterministic=deterministic
    )
    if self.config.tie_word_embeddings:
      return self.transformer.wte.attend(h_btd)
    return self.lm_head(h_btd)
