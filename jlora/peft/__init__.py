"""Hugging Face PEFT interop for ``jlora.models``: LoRA adapters that travel, and load only when safe.

* ``save_pretrained(path, adapters, config, model, params=...)``: write a jlora adapter as a PEFT LoRA
  adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained`` loads on the transformers model and computes the same outputs.
* ``from_pretrained(path, model, params)``: load a PEFT LoRA adapter as ``(adapters, LoraConfig)``
  through jlora's safety checks (``jlora.UnsafeAdapterError`` on anything wrong).
* ``from_pretrained_with_base(path, model, params)``: ``(params', adapters, LoraConfig)`` for every PEFT type,
  with a VeRA adapter's stored projections added to the params (``params'["jlora:state"]``).
* ``save_merged(path, model, params, adapters, config)``: the merged model as a Hugging Face checkpoint.
* ``base_fingerprint(model, params)``: the layout- and precision-independent base fingerprint that
  exported adapters carry.

Supported bases are the ``jlora.models`` architectures (Llama, Mistral, Qwen2, Gemma, GPT-2, BERT);
module names and layouts come from their name maps. ``import jlora.peft`` explicitly; it never
imports torch or peft.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
  >>> from jlora import models
  >>> model = models.GPT2LMHeadModel(models.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2))
  >>> ids = jnp.zeros((1, 4), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> config = jlora.LoraConfig(targets=r".*/c_attn/kernel", rank=4, alpha=8.0)
  >>> adapters = jlora.Lora(model, config).init(jax.random.key(1), params, ids)
  >>> path = tempfile.mkdtemp()
  >>> written = jlora.peft.save_pretrained(path, adapters, config, model, params=params)
  >>> written["target_modules"], written["fan_in_fan_out"]
  (['c_attn'], True)
  >>> loaded, loaded_config = jlora.peft.from_pretrained(path, model, params)
  >>> loaded_config.targets, jax.tree.map(jnp.shape, loaded)["transformer"]["h"]["attn"]["c_attn"]["kernel"]
  (['transformer/h/attn/c_attn/kernel'], {'lora_a': (2, 16, 4), 'lora_b': (2, 4, 48)})
"""

from jlora.peft._export import save_pretrained
from jlora.peft._fingerprint import base_fingerprint
from jlora.peft._formats import from_pretrained_with_base
from jlora.peft._import import from_pretrained
from jlora.peft._merged import save_merged

__all__ = ["base_fingerprint", "from_pretrained", "from_pretrained_with_base", "save_merged", "save_pretrained"]
