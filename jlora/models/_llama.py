"""The Llama family of decoders: Llama 2/3, Mistral, Qwen2/2.5 and Gemma, one module with config switches.

Parameter paths follow the Hugging Face module names, e.g. ``model/layers/self_attn/q_proj/kernel``
(``nn.scan``-ned layers, leading layer axis) or ``model/layers_0/self_attn/q_proj/kernel`` (unrolled).
Every weight matrix is a plain ``nn.Dense`` / ``nn.Embed`` with kernels laid out ``(in, out)``.
"""

import dataclasses
import math

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._decoder import CausalLM, Decoder
from jlora.models._partition import partition_rules
from jlora.models._rope import Llama3RopeScaling
from jlora.models._stacking import RematPolicy
from jlora.models._transformer import LayerNames, TransformerSpec

_NAMES = LayerNames(
    body="model", tokens="embed_tokens", layers="layers", final_norm="norm",
    attention="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", norm_1="input_layernorm",
    mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj", norm_2="post_attention_layernorm",
)

_RULES = partition_rules(_NAMES, post_norm=False, outside_layers={
    # Vocab-parallel embedding (the tied head's logits then come out split over the vocabulary).
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "norm/scale": P(),
    "lm_head/kernel": P("fsdp", "tensor"),
})


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

  @property
  def transformer(self) -> TransformerSpec:
    """This config as the transformer core reads it: pre-norm, RMSNorm, gated MLP, RoPE."""
    return TransformerSpec.from_config(
        self,
        names=_NAMES, num_layers=self.num_hidden_layers, width=self.hidden_size, vocab_size=self.vocab_size,
        tie_word_embeddings=self.tie_word_embeddings,
        embedding_scale=math.sqrt(self.hidden_size) if self.scale_embeddings else None,
        # Attention: grouped-query heads, RoPE, an optional sliding window, no residual dropout.
        num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
        attention_scale=self.head_dim**-0.5, qkv_bias=self.qkv_bias, o_bias=self.o_bias,
        rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, sliding_window=self.sliding_window,
        attention_dropout=self.attention_dropout, residual_dropout=0.0,
        # Gated MLP; pre-norm RMSNorm.
        mlp_width=self.intermediate_size, activation=self.hidden_act, gated_mlp=True, mlp_bias=self.mlp_bias,
        norm="rms", norm_eps=self.rms_norm_eps, norm_zero_centered=self.norm_zero_centered,
    )


class LlamaModel(Decoder):
  """The decoder body (HF ``LlamaModel``): embeddings, layers and final norm; returns hidden states."""

  config: LlamaConfig
  partition_rules = _RULES


class LlamaForCausalLM(CausalLM):
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
  body_class = LlamaModel
  partition_rules = _RULES
