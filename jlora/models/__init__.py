"""Reference models that load Hugging Face checkpoints and GGUF files: Llama family, Gemma, GPT-2, BERT.

Flax linen modules whose parameters are a plain pytree named after the Hugging Face modules
(``model/layers/self_attn/q_proj/kernel``), so LoRA targets are regexes over '/'-joined paths; every
weight matrix is a plain ``nn.Dense`` / ``nn.Embed``. Checkpoints are read and written as
safetensors without torch; GGUF files (llama.cpp's format, quantized or not) load through the same
strict path, their tokenizer and chat template included; generation runs a jitted KV-cache loop.

The architectures share one transformer core (``_transformer.py``: attention, MLP, norms, the pre- or
post-norm layer; ``_decoder.py``: the causal body and LM head); an architecture file holds its config,
its Hugging Face names and how the config maps onto the core. Each model class carries its default
sharding rules as ``partition_rules``, which ``jlora.sharding.rules_for`` reads.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import models
  >>> config = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
  ...                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  >>> model = models.LlamaForCausalLM(config)
  >>> prompt = jnp.array([[0, 5, 7], [3, 1, 4]])
  >>> mask = jnp.array([[0, 1, 1], [1, 1, 1]])   # left padding
  >>> params = model.init(jax.random.key(0), prompt)["params"]
  >>> models.generate(model, params, prompt, mask, max_new_tokens=4).shape
  (2, 7)
"""

from jlora.models._bert import BertConfig, BertModel
from jlora.models._chat_template import ChatTemplate, apply_chat_template, load_chat_template
from jlora.models._checkpoint import from_pretrained, model_for_config, save_pretrained
from jlora.models._errors import CheckpointError
from jlora.models._generate import generate
from jlora.models._gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.models._hf_configs import config_from_hf, config_to_hf
from jlora.models._kv_cache import init_cache
from jlora.models._llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from jlora.models._pooling import mean_pool
from jlora.models._rope import Llama3RopeScaling
from jlora.models._sampling import sample_token
from jlora.models._tokenizer import load_tokenizer

__all__ = [
    "BertConfig",
    "BertModel",
    "ChatTemplate",
    "CheckpointError",
    "GPT2Config",
    "GPT2LMHeadModel",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "apply_chat_template",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "generate",
    "init_cache",
    "load_chat_template",
    "load_tokenizer",
    "mean_pool",
    "model_for_config",
    "sample_token",
    "save_pretrained",
]
