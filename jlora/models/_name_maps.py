"""The one table per architecture that pairs Hugging Face tensor names with jlora parameter paths.

Both directions (loading and saving) read the same :class:`NameMap`. A rule whose names contain
``{i}`` is repeated for every layer: its Hugging Face name gets the layer number, and its parameter
path either gets it too (``layers_{i}`` -> ``layers_3``, unrolled layers) or loses the ``_{i}`` suffix
and stacks all layers along a leading axis (``layers``, ``nn.scan``-ned layers).
"""

import dataclasses

from jlora.models._bert import BertConfig
from jlora.models._gpt2 import GPT2Config
from jlora.models._llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One Hugging Face tensor <-> one parameter leaf.

  Attributes:
    hf_name: e.g. ``"model.layers.{i}.self_attn.q_proj.weight"``.
    param_path: '/'-joined path in the unrolled layout, e.g.
      ``"model/layers_{i}/self_attn/q_proj/kernel"``.
    transpose: whether the Hugging Face tensor is the transposed leaf (``nn.Linear`` weights are
      ``(out, in)``, ``nn.Dense`` kernels ``(in, out)``).
  """

  hf_name: str
  param_path: str
  transpose: bool = False

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


@dataclasses.dataclass(frozen=True)
class NameMap:
  """How one architecture's checkpoint tensors map onto its parameters.

  Attributes:
    rules: the tensor rules.
    num_layers: how many times per-layer rules repeat.
    base_prefix: prefix of the base model's tensors (``"model."``, ``"transformer."``, ``"bert."``).
    prefixed: whether the canonical names (in ``rules``) carry ``base_prefix``. A checkpoint of the
      other flavour (e.g. GPT-2's original ``GPT2Model`` files without ``transformer.``, or a
      ``BertForMaskedLM`` file with ``bert.``) is renamed to the canonical one when loading.
    ignored: regexes (fullmatch) of tensors that may be in a checkpoint and are not parameters
      (buffers, tied heads).
  """

  rules: tuple[TensorRule, ...]
  num_layers: int
  base_prefix: str
  prefixed: bool
  ignored: tuple[str, ...] = ()


def _linear(hf_module: str, path: str, bias: bool) -> list[TensorRule]:
  rules = [TensorRule(f"{hf_module}.weight", f"{path}/kernel", transpose=True)]
  if bias:
    rules.append(TensorRule(f"{hf_module}.bias", f"{path}/bias"))
  return rules


def _conv1d(hf_module: str, path: str) -> list[TensorRule]:
  # GPT-2's Conv1D stores its weight as (in, out) already.
  return [TensorRule(f"{hf_module}.weight", f"{path}/kernel"), TensorRule(f"{hf_module}.bias", f"{path}/bias")]


def _layer_norm(hf_module: str, path: str) -> list[TensorRule]:
  return [TensorRule(f"{hf_module}.weight", f"{path}/scale"), TensorRule(f"{hf_module}.bias", f"{path}/bias")]


def llama_name_map(config: LlamaConfig) -> NameMap:
  """Name map of Llama, Mistral, Qwen2 and Gemma (HF ``*ForCausalLM``)."""
  layer, path = "model.layers.{i}", "model/layers_{i}"
  rules = [TensorRule("model.embed_tokens.weight", "model/embed_tokens/embedding")]
  for proj in ("q_proj", "k_proj", "v_proj"):
    rules += _linear(f"{layer}.self_attn.{proj}", f"{path}/self_attn/{proj}", config.qkv_bias)
  rules += _linear(f"{layer}.self_attn.o_proj", f"{path}/self_attn/o_proj", config.o_bias)
  for proj in ("gate_proj", "up_proj", "down_proj"):
    rules += _linear(f"{layer}.mlp.{proj}", f"{path}/mlp/{proj}", config.mlp_bias)
  for norm in ("input_layernorm", "post_attention_layernorm"):
    rules.append(TensorRule(f"{layer}.{norm}.weight", f"{path}/{norm}/scale"))
  rules.append(TensorRule("model.norm.weight", "model/norm/scale"))
  ignored = [r"model\.rotary_emb\.inv_freq", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
  if config.tie_word_embeddings:
    ignored.append(r"lm_head\.weight")  # some tied checkpoints store the shared matrix twice
  else:
    rules += _linear("lm_head", "lm_head", bias=False)
  return NameMap(tuple(rules), config.num_hidden_layers, "model.", True, tuple(ignored))


def gpt2_name_map(config: GPT2Config) -> NameMap:
  """Name map of GPT-2 (HF ``GPT2LMHeadModel``; ``GPT2Model`` files load too)."""
  layer, path = "transformer.h.{i}", "transformer/h_{i}"
  rules = [
      TensorRule("transformer.wte.weight", "transformer/wte/embedding"),
      TensorRule("transformer.wpe.weight", "transformer/wpe/embedding"),
      *_layer_norm(f"{layer}.ln_1", f"{path}/ln_1"),
      *_conv1d(f"{layer}.attn.c_attn", f"{path}/attn/c_attn"),
      *_conv1d(f"{layer}.attn.c_proj", f"{path}/attn/c_proj"),
      *_layer_norm(f"{layer}.ln_2", f"{path}/ln_2"),
      *_conv1d(f"{layer}.mlp.c_fc", f"{path}/mlp/c_fc"),
      *_conv1d(f"{layer}.mlp.c_proj", f"{path}/mlp/c_proj"),
      *_layer_norm("transformer.ln_f", "transformer/ln_f"),
  ]
  # attn.bias / attn.masked_bias are the causal-mask buffers of older transformers versions.
  ignored = [r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"]
  if config.tie_word_embeddings:
    ignored.append(r"lm_head\.weight")
  else:
    rules += _linear("lm_head", "lm_head", bias=False)
  return NameMap(tuple(rules), config.n_layer, "transformer.", True, tuple(ignored))


def bert_name_map(config: BertConfig) -> NameMap:
  """Name map of BERT encoders (HF ``BertModel``; the ``bert.`` body of ``BertFor*`` files loads too)."""
  layer, path = "encoder.layer.{i}", "encoder/layer_{i}"
  rules = [
      TensorRule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
      TensorRule("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
      TensorRule("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding"),
      *_layer_norm("embeddings.LayerNorm", "embeddings/LayerNorm"),
  ]
  for proj in ("query", "key", "value"):
    rules += _linear(f"{layer}.attention.self.{proj}", f"{path}/attention/self/{proj}", bias=True)
  rules += _linear(f"{layer}.attention.output.dense", f"{path}/attention/output/dense", bias=True)
  rules += _layer_norm(f"{layer}.attention.output.LayerNorm", f"{path}/attention/output/LayerNorm")
  rules += _linear(f"{layer}.intermediate.dense", f"{path}/intermediate/dense", bias=True)
  rules += _linear(f"{layer}.output.dense", f"{path}/output/dense", bias=True)
  rules += _layer_norm(f"{layer}.output.LayerNorm", f"{path}/output/LayerNorm")
  if config.add_pooling_layer:
    rules += _linear("pooler.dense", "pooler/dense", bias=True)
  ignored = [r"embeddings\.position_ids", r"embeddings\.token_type_ids"]
  return NameMap(tuple(rules), config.num_hidden_layers, "bert.", False, tuple(ignored))


def name_map(config: LlamaConfig | GPT2Config | BertConfig) -> NameMap:
  """The :class:`NameMap` of a model config."""
  if isinstance(config, LlamaConfig):
    return llama_name_map(config)
  if isinstance(config, GPT2Config):
    return gpt2_name_map(config)
  return bert_name_map(config)
