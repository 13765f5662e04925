"""Hugging Face ``config.json`` dictionaries <-> the config dataclasses of ``jlora.models``.

Only architecture fields are translated; runtime choices (dtype, scan, remat) are not part of a
checkpoint. Settings that would change the computation in ways these models do not implement are
refused with a :class:`CheckpointError` instead of being ignored.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from jlora._errors import JloraError
from jlora.models._bert import BertConfig
from jlora.models._errors import CheckpointError
from jlora.models._gpt2 import GPT2Config
from jlora.models._llama import LlamaConfig
from jlora.models._rope import Llama3RopeScaling

ModelConfig = LlamaConfig | GPT2Config | BertConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2", "bert")

# transformers' defaults where they differ between the family members (used when a key is absent).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(
        hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=131072,
        sliding_window=4096,
    ),
    "qwen2": dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "gemma": dict(
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=8192,
        head_dim=256,
    ),
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}


def _refuse(hf: Mapping[str, Any], key: str, supported: Any, why: str) -> None:
  value = hf.get(key, supported)
  if value != supported and value is not None:
    raise CheckpointError(f"config.json sets {key}={value!r}, which jlora.models does not support: {why}.")


def _token_ids(value: Any) -> int | tuple[int, ...] | None:
  return tuple(value) if isinstance(value, list) else value


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  # transformers >= 5 writes "rope_parameters"; older configs have "rope_theta" and "rope_scaling".
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise CheckpointError(f"RoPE type {rope_type!r} is not supported (only 'default' and 'llama3').")
  try:
    scaling = Llama3RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        ),
    )
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"llama3 RoPE scaling in config.json lacks a field: {e}.") from None
  return theta, scaling


def _llama_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
  model_type = hf["model_type"]
  get = lambda key: hf.get(key, _FAMILY_DEFAULTS[model_type].get(key))  # noqa: E731
  theta, scaling = _rope_from_hf(hf)
  hidden_act = get("hidden_act")
  sliding_window = None
  qkv_bias = o_bias = bool(hf.get("attention_bias", False))
  if model_type == "gemma":
    # Gemma's official configs say "gelu" but mean the tanh approximation (as transformers does).
    hidden_act = hf.get("hidden_activation") or hidden_act
    hidden_act = "gelu_pytorch_tanh" if hidden_act == "gelu" else hidden_act
    _refuse(hf, "use_bidirectional_attention", False, "only causal Gemma is implemented")
  elif model_type == "mistral":
    sliding_window = get("sliding_window")
    if hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
      raise CheckpointError("Mistral with mixed layer_types is not supported.")
  elif model_type == "qwen2":
    qkv_bias, o_bias = True, False
    _refuse(hf, "use_sliding_window", False, "Qwen2's per-layer sliding window is not implemented")
  _refuse(hf, "pretraining_tp", 1, "tensor-parallel slicing of the MLP is not implemented")
  return LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"],
      num_attention_heads=hf["num_attention_heads"],
      num_key_value_heads=hf.get("num_key_value_heads"),
      head_dim=get("head_dim"),
      max_position_embeddings=get("max_position_embeddings"),
      rms_norm_eps=float(get("rms_norm_eps")),
      rope_theta=theta,
      rope_scaling=scaling,
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      hidden_act=hidden_act,
      tie_word_embeddings=bool(get("tie_word_embeddings")),
      norm_zero_centered=model_type == "gemma",
      scale_embeddings=model_type == "gemma",
      sliding_window=sliding_window,
      attention_dropout=float(hf.get("attention_dropout", 0.0)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      model_type=model_type,
      bos_token_id=_token_ids(hf.get("bos_token_id")),
      eos_token_id=_token_ids(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
  )


def _gpt2_from_hf(hf: Mapping[str, Any]) -> GPT2Config:
  _refuse(hf, "scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling is not implemented")
  _refuse(hf, "add_cross_attention", False, "cross-attention is not implemented")
  defaults = GPT2Config()
  fields = {f.name for f in dataclasses.fields(GPT2Config)} - {"dtype", "param_dtype", "scan_layers", "remat"}
  return GPT2Config(**{name: hf.get(name, getattr(defaults, name)) for name in fields})


def _bert_from_hf(hf: Mapping[str, Any]) -> BertConfig:
  _refuse(hf, "position_embedding_type", "absolute", "only absolute position embeddings are implemented")
  _refuse(hf, "is_decoder", False, "only the encoder is implemented")
  _refuse(hf, "add_cross_attention", False, "cross-attention is not implemented")
  defaults = BertConfig()
  fields = {f.name for f in dataclasses.fields(BertConfig)} - {
      "dtype", "param_dtype", "scan_layers", "remat", "add_pooling_layer"
  }
  return BertConfig(**{name: hf.get(name, getattr(defaults, name)) for name in fields})


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """The config dataclass described by a Hugging Face ``config.json`` dictionary.

  Args:
    hf: the parsed ``config.json``; ``model_type`` picks the architecture.

  Returns:
    A :class:`LlamaConfig` (llama, mistral, qwen2, gemma), :class:`GPT2Config` or
    :class:`BertConfig` with default runtime fields (float32, default stacking).

  Raises:
    CheckpointError: unknown ``model_type`` or an unsupported setting.
  """
  model_type = hf.get("model_type")
  parsers = {**{family: _llama_from_hf for family in LLAMA_FAMILY}, "gpt2": _gpt2_from_hf, "bert": _bert_from_hf}
  if model_type not in parsers:
    raise CheckpointError(
        f"config.json has model_type={model_type!r}; jlora.models supports {list(SUPPORTED_MODEL_TYPES)}."
    )
  try:
    return parsers[model_type](hf)
  except CheckpointError:
    raise
  except (JloraError, KeyError, TypeError) as e:  # e.g. an unknown activation or a missing size
    raise CheckpointError(f"config.json of model_type={model_type!r} is not usable: {e!r}.") from e


def _llama_to_hf(config: LlamaConfig) -> dict[str, Any]:
  rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": config.rope_theta,
        **dataclasses.asdict(config.rope_scaling),
    }
  hf = {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "hidden_act": config.hidden_act,
      "tie_word_embeddings": config.tie_word_embeddings,
      "attention_dropout": config.attention_dropout,
      "initializer_range": config.initializer_range,
      # transformers >= 5 reads rope_parameters; older versions read rope_theta / rope_scaling.
      "rope_parameters": rope_parameters,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope_parameters if config.rope_scaling is not None else None,
  }
  if config.model_type in ("llama", "gemma"):
    if config.qkv_bias != config.o_bias:
      raise CheckpointError(f"{config.model_type} has one attention_bias for q, k, v and o projections.")
    hf["attention_bias"] = config.qkv_bias
  if config.model_type == "llama":
    hf["mlp_bias"] = config.mlp_bias
  if config.model_type == "mistral":
    hf["sliding_window"] = config.sliding_window
  if config.model_type == "qwen2":
    hf["use_sliding_window"] = False
  if config.model_type == "gemma":
    hf["hidden_activation"] = config.hidden_act
  expected = _llama_from_hf({**hf, "model_type": config.model_type})
  runtime = dict(dtype=config.dtype, param_dtype=config.param_dtype, scan_layers=config.scan_layers, remat=config.remat)
  token_ids = dict(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
  if dataclasses.replace(expected, **runtime, **token_ids) != config:
    raise CheckpointError(
        f"This LlamaConfig cannot be written as a Hugging Face {config.model_type!r} config: its switches "
        f"(biases, norms, embedding scaling, sliding window) differ from that model type's."
    )
  return hf


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dictionary of a config dataclass (inverse of ``config_from_hf``).

  Args:
    config: a :class:`LlamaConfig`, :class:`GPT2Config` or :class:`BertConfig`.

  Returns:
    A JSON-serialisable dict with ``model_type`` and ``architectures``.

  Raises:
    CheckpointError: a ``LlamaConfig`` whose switches do not match its ``model_type``.
  """
  runtime = {"dtype", "param_dtype", "scan_layers", "remat", "add_pooling_layer"}
  if isinstance(config, LlamaConfig):
    model_type = config.model_type
    hf = _llama_to_hf(config)
    hf.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
  else:
    model_type = "gpt2" if isinstance(config, GPT2Config) else "bert"
    hf = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in runtime}
  hf = {key: list(value) if isinstance(value, tuple) else value for key, value in hf.items()}
  return {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]], **hf}
