"""GPT-2: learned positions, LayerNorm, fused ``c_attn`` projection, tied LM head.

Parameter paths follow the Hugging Face module names, e.g. ``transformer/h/attn/c_attn/kernel``
(``nn.scan``-ned layers, leading layer axis) or ``transformer/h_0/attn/c_attn/kernel`` (unrolled).
GPT-2's ``Conv1D`` weights are already laid out ``(in, out)``, so they are the ``nn.Dense`` kernels
as they are.
"""

import dataclasses

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError
from jlora.models._activations import activation
from jlora.models._decoder import CausalLM, Decoder
from jlora.models._partition import partition_rules
from jlora.models._stacking import RematPolicy
from jlora.models._transformer import LayerNames, TransformerSpec

_NAMES = LayerNames(
    body="transformer", tokens="wte", positions="wpe", layers="h", final_norm="ln_f",
    attention="attn", qkv="c_attn", o="c_proj", norm_1="ln_1",
    mlp="mlp", up="c_fc", down="c_proj", norm_2="ln_2",
)

_RULES = partition_rules(_NAMES, post_norm=False, outside_layers={
    # GPT-2's vocabulary (50257) is odd, so the embeddings split the hidden axis, not the vocabulary.
    "(?:wte|wpe)/embedding": P(None, "fsdp"),
    "ln_f/(?:scale|bias)": P(),
    "lm_head/kernel": P("fsdp", None),
})


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

  @property
  def transformer(self) -> TransformerSpec:
    """This config as the transformer core reads it: pre-norm, LayerNorm, plain MLP, learned positions."""
    head_dim = self.n_embd // self.n_head
    return TransformerSpec.from_config(
        self,
        names=_NAMES, num_layers=self.n_layer, width=self.n_embd, vocab_size=self.vocab_size,
        tie_word_embeddings=self.tie_word_embeddings, max_positions=self.n_positions,
        # Attention: multi-head (one fused c_attn), biases everywhere.
        num_heads=self.n_head, num_kv_heads=self.n_head, head_dim=head_dim, qkv_bias=True, o_bias=True,
        attention_scale=head_dim**-0.5 if self.scale_attn_weights else 1.0,
        attention_dropout=self.attn_pdrop, residual_dropout=self.resid_pdrop, embedding_dropout=self.embd_pdrop,
        # Plain MLP; pre-norm LayerNorm.
        mlp_width=self.n_inner, activation=self.activation_function, gated_mlp=False, mlp_bias=True,
        norm="layer", norm_eps=self.layer_norm_epsilon,
    )


class GPT2Model(Decoder):
  """The GPT-2 body (HF ``GPT2Model``): token + position embeddings, blocks, final LayerNorm."""

  config: GPT2Config
  partition_rules = _RULES


class GPT2LMHeadModel(CausalLM):
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
  body_class = GPT2Model
  partition_rules = _RULES
