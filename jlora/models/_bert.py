"""BERT encoders (BERT, MiniLM, sentence-transformers checkpoints): post-norm, bidirectional attention.

Parameter paths follow the Hugging Face module names, e.g.
``encoder/layer_0/attention/self/query/kernel`` (unrolled, the default) or
``encoder/layer/attention/self/query/kernel`` (``nn.scan``-ned, leading layer axis).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._attention import attention_mask as make_attention_mask
from jlora.models._partition import partition_rules
from jlora.models._stacking import RematPolicy
from jlora.models._transformer import LayerNames, TransformerSpec, apply_blocks, dense, embed, norm

_NAMES = LayerNames(
    layers="layer",  # inside the model's "encoder"
    attention="attention", heads="self", q="query", k="key", v="value", output="output", o="dense",
    norm_1="LayerNorm",
    mlp="intermediate", up="dense", down="dense", norm_2="LayerNorm",
)

_RULES = partition_rules(_NAMES, post_norm=True, stack="encoder/layer", outside_layers={
    # BERT's vocabulary (30522 = 2 * 3 * 5087) rarely divides a mesh axis: split the hidden axis.
    "embeddings/(?:word|position|token_type)_embeddings/embedding": P(None, "fsdp"),
    "embeddings/LayerNorm/(?:scale|bias)": P(),
    "pooler/dense/kernel": P("fsdp", "tensor"),
    "pooler/dense/bias": P("tensor"),
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder; field names follow Hugging Face's ``BertConfig``.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``D``.
    num_hidden_layers: number of layers.
    num_attention_heads: attention heads.
    intermediate_size: MLP width.
    hidden_act: MLP activation (``"gelu"`` is the exact, erf-based GELU).
    hidden_dropout_prob: dropout on embeddings and sub-layer outputs (with ``deterministic=False``).
    attention_probs_dropout_prob: dropout on attention weights.
    max_position_embeddings: number of learned positions.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    add_pooling_layer: whether the model has the ``pooler`` (dense + tanh on the first token).
    pad_token_id: kept for ``save_pretrained``.
    initializer_range: std of the normal initialiser of fresh weights.
    dtype: compute dtype.
    param_dtype: dtype of the parameters.
    scan_layers: stack layers with ``nn.scan`` (params get a leading layer axis).
    remat: rematerialisation policy of each layer: "none", "full", "dots" or "dots_no_batch".
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  add_pooling_layer: bool = True
  pad_token_id: int | None = 0
  initializer_range: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False
  remat: RematPolicy = "none"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise JloraError(
          f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
          f"({self.num_attention_heads})."
      )
    activation(self.hidden_act)

  @property
  def transformer(self) -> TransformerSpec:
    """This config as the transformer core reads it: post-norm, LayerNorm, plain MLP, no cache."""
    head_dim = self.hidden_size // self.num_attention_heads
    return TransformerSpec.from_config(
        self,
        names=_NAMES, num_layers=self.num_hidden_layers, width=self.hidden_size,
        # Attention: bidirectional multi-head, biases everywhere, no cache.
        num_heads=self.num_attention_heads, num_kv_heads=self.num_attention_heads, head_dim=head_dim,
        qkv_bias=True, o_bias=True, attention_scale=head_dim**-0.5,
        attention_dropout=self.attention_probs_dropout_prob, residual_dropout=self.hidden_dropout_prob,
        # Plain MLP; post-norm LayerNorm.
        mlp_width=self.intermediate_size, activation=self.hidden_act, gated_mlp=False, mlp_bias=True,
        norm="layer", norm_eps=self.layer_norm_eps, post_norm=True,
    )


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  @nn.compact
  def __call__(
      self, input_ids: jax.Array, token_type_ids: jax.Array, position_ids: jax.Array, *, deterministic: bool
  ) -> jax.Array:
    cfg, spec = self.config, self.config.transformer
    h_btd = (
        embed(spec, cfg.vocab_size, "word_embeddings")(input_ids)
        + embed(spec, cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        + embed(spec, cfg.max_position_embeddings, "position_embeddings")(position_ids)
    )
    h_btd = norm(spec, "LayerNorm")(h_btd)
    return nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(h_btd)


class BertEncoder(nn.Module):
  """The stack of post-norm layers (HF ``encoder.layer``)."""

  config: BertConfig

  @nn.compact
  def __call__(self, h_btd: jax.Array, mask_bts: jax.Array, *, deterministic: bool) -> jax.Array:
    return apply_blocks(self.config.transformer, h_btd, mask_bts, None, None, decode=False, deterministic=deterministic)


class BertPooler(nn.Module):
  """``tanh(dense(h[:, 0]))``: BERT's pooled output of the first (``[CLS]``) token."""

  config: BertConfig

  @nn.compact
  def __call__(self, h_btd: jax.Array) -> jax.Array:
    return jnp.tanh(dense(self.config.transformer, self.config.hidden_size, True, "dense")(h_btd[:, 0]))


class BertModel(nn.Module):
  """A BERT encoder (HF ``BertModel``): ``apply`` maps token ids to the last hidden states.

  For sentence embeddings (sentence-transformers' MiniLM and friends) mean-pool the hidden states
  with :func:`jlora.models.mean_pool`; for BERT's own pooled output call
  ``model.apply(variables, hidden, method=BertModel.pool)``.

  Attributes:
    config: the hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlora.models import mean_pool
    >>> model = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
    ...                              num_attention_heads=2, intermediate_size=32))
    >>> ids, mask = jnp.array([[2, 7, 9, 0]]), jnp.array([[1, 1, 1, 0]])
    >>> params = model.init(jax.random.key(0), ids, mask)["params"]
    >>> hidden = model.apply({"params": params}, ids, mask)
    >>> hidden.shape, mean_pool(hidden, mask).shape
    ((1, 4, 16), (1, 16))
    >>> sorted(params["encoder"]["layer_0"]["attention"]["self"])
    ['key', 'query', 'value']
  """

  config: BertConfig
  partition_rules = _RULES

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)
    if self.config.add_pooling_layer:
      self.pooler = BertPooler(self.config)

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
  ) -> jax.Array:
    """The last hidden states ``(B, T, D)`` of token ids ``(B, T)``.

    Args:
      input_ids: int token ids, shape ``(B, T)``.
      attention_mask: 1 for tokens, 0 for padding, shape ``(B, T)``; None means no padding.
      token_type_ids: segment ids ``(B, T)``; None means all zeros.
      position_ids: int positions ``(B, T)``; None means ``0 .. T-1`` (as transformers).
      deterministic: disable dropout; with False a ``"dropout"`` rng is needed.

    Returns:
      Hidden states of shape ``(B, T, hidden_size)`` in the compute dtype.
    """
    batch, length = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    h_btd = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
    mask_bts = make_attention_mask(attention_mask, jnp.arange(length), causal=False)
    h_btd = self.encoder(h_btd, mask_bts, deterministic=deterministic)
    if self.config.add_pooling_layer and self.is_initializing():
      self.pooler(h_btd)  # create the pooler's params at init
    return h_btd

  def pool(self, hidden_btd: jax.Array) -> jax.Array:
    """BERT's pooled output ``tanh(pooler.dense(hidden[:, 0]))``, shape ``(B, D)``.

    Args:
      hidden_btd: the output of ``__call__``.

    Returns:
      The pooled first-token representation.
    """
    if not self.config.add_pooling_layer:
      raise JloraError("This BertModel has no pooler (config.add_pooling_layer=False); use mean_pool.")
    return self.pooler(hidden_btd)
