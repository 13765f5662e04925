"""Llama-family decoders (Llama 2/3, llama3 RoPE, Mistral, Qwen2, Gemma) against transformers."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _cases import assert_tolerance_rejects
from test_models_references import (
  assert_close_on_tokens,
  left_padded_batch,
  position_ids,
  save_hf,
  tiny_hf_model,
  torch_outputs,
)

from jlora import models
from jlora.models._norms import RMSNorm

LLAMA_FAMILY = ("llama", "llama3_rope", "mistral", "qwen2", "gemma")


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_logits_match_transformers_on_left_padded_batch(arch, scan_layers, tmp_path):
  reference = tiny_hf_model(arch)
  model, params = models.from_pretrained(save_hf(reference, tmp_path), scan_layers=scan_layers)
  ids, mask = left_padded_batch()
  expected = torch_outputs(reference, ids, mask, position_ids=position_ids(mask))
  logits = jax.jit(model.apply)({"params": params}, ids, mask)
  assert logits.shape == (2, 10, reference.config.vocab_size)
  assert_close_on_tokens(logits, expected, mask, atol=1e-4)


def test_config_switches_follow_the_checkpoint(tmp_path):
  expectations = {
      "llama": dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=False, rope_theta=500.0),
      "llama3_rope": dict(tie_word_embeddings=True, rope_scaling=models.Llama3RopeScaling(8.0, 1.0, 4.0, 32)),
      "mistral": dict(sliding_window=4, qkv_bias=False),
      "qwen2": dict(qkv_bias=True, o_bias=False),
      "gemma": dict(
          norm_zero_centered=True,
          scale_embeddings=True,
          tie_word_embeddings=True,
          head_dim=24,
          hidden_act="gelu_pytorch_tanh",
      ),
  }
  for arch, fields in expectations.items():
    model, _ = models.from_pretrained(save_hf(tiny_hf_model(arch), tmp_path / arch))
    assert isinstance(model, models.LlamaForCausalLM)
    assert {k: getattr(model.config, k) for k in fields} == fields, arch
    assert model.config.scan_layers  # scan is the decoders' default


def test_param_paths_follow_hf_module_names(tmp_path):
  _, params = models.from_pretrained(save_hf(tiny_hf_model("qwen2"), tmp_path), scan_layers=False)
  paths = {"/".join(k) for k in _flat_paths(params)}
  assert "model/layers_1/self_attn/q_proj/kernel" in paths
  assert "model/layers_1/self_attn/q_proj/bias" in paths
  assert "model/layers_0/mlp/gate_proj/kernel" in paths
  assert "model/embed_tokens/embedding" in paths and "lm_head/kernel" in paths
  # Kernels are (in, out): q_proj maps hidden 64 -> 4 heads x 16.
  assert params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (64, 64)
  assert params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)


def _flat_paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _norm_statistics_in_bf16(next_fun, args, kwargs, context):
  """A wrong bf16 model: RMSNorm's mean square and rsqrt taken in bf16 instead of float32 (Gemma's 1 + w)."""
  if not (isinstance(context.module, RMSNorm) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  norm, x = context.module, args[0].astype(jnp.bfloat16)
  assert norm.zero_centered
  scale = norm.get_variable("params", "scale").astype(jnp.bfloat16).reshape((1,) * (x.ndim - 1) + (-1,))
  normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + jnp.bfloat16(norm.epsilon))
  return (normed * (1 + scale)).astype(norm.dtype)


def test_bf16_compute_stays_close_to_fp32(tmp_path):
  directory = save_hf(tiny_hf_model("gemma"), tmp_path)
  model32, params32 = models.from_pretrained(directory)
  model16, params16 = models.from_pretrained(directory, dtype=jnp.bfloat16)
  assert params16["model"]["embed_tokens"]["embedding"].dtype == jnp.float32  # param dtype is separate
  ids, mask = left_padded_batch()
  logits32 = np.asarray(jax.jit(model32.apply)({"params": params32}, ids, mask))
  logits16 = jax.jit(model16.apply)({"params": params16}, ids, mask)
  assert logits16.dtype == jnp.bfloat16
  # One bf16 step at the logits' magnitude (|logits| < 4: steps of 2^-6): bf16 activations with float32 norm
  # statistics and softmax land within it (measured: 0.0095); the same model with its norm statistics in bf16
  # lands outside (0.023), which the test checks.
  keep = mask.astype(bool)
  assert np.abs(logits32[keep]).max() < 4
  atol = 2.0**-6
  assert_close_on_tokens(logits16, logits32, mask, atol=atol)
  with nn.intercept_methods(_norm_statistics_in_bf16):  # a new function: traced afresh, under the interceptor
    wrong = jax.jit(lambda p: model16.apply({"params": p}, ids, mask))(params16)
  assert_tolerance_rejects(logits32[keep], {"norm statistics in bf16": np.asarray(wrong, np.float32)[keep]},
                           rtol=0, atol=atol)


def test_remat_policies_keep_values_and_gradients(tmp_path):
  directory = save_hf(tiny_hf_model("llama"), tmp_path)
  model, params = models.from_pretrained(directory)
  ids, mask = left_padded_batch()

  @functools.partial(jax.jit, static_argnums=1)
  def loss_and_grads(p, m):
    return jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, ids, mask) ** 2))(p)

  expected = loss_and_grads(params, model)
  for remat in ("full", "dots"):
    remat_model = model.clone(config=dataclasses.replace(model.config, remat=remat))
    chex.assert_trees_all_close(loss_and_grads(params, remat_model), expected, rtol=1e-4, atol=1e-4)


def test_forward_is_a_pure_function_of_sharded_params(tmp_path):
  """Params sharded over the 8 fake devices (FSDP-style, incl. the scan layer axis) give the same logits."""
  model, params = models.from_pretrained(save_hf(tiny_hf_model("mistral"), tmp_path))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  assert mesh.size == 8

  def shard(leaf):
    axis = next((i for i in reversed(range(leaf.ndim)) if leaf.shape[i] % mesh.size == 0), None)
    spec = [None] * leaf.ndim
    if axis is not None:
      spec[axis] = "fsdp"
    return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

  sharded = jax.tree.map(shard, params)
  assert len(sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.device_set) == 8
  ids, mask = left_padded_batch()
  forward = jax.jit(model.apply)
  expected = forward({"params": params}, ids, mask)
  chex.assert_trees_all_close(forward({"params": sharded}, ids, mask), expected, atol=1e-5)


def test_unknown_remat_policy_is_refused():
  config = models.LlamaConfig(
      vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, remat="some"
  )
  with pytest.raises(ValueError, match="remat must be one of"):
    models.LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_packed_rows_equal_separate_sequences():
  """segment_ids: each packed example gets exactly the logits it gets alone (block-diagonal causal attention)."""
  config = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
  model = models.LlamaForCausalLM(config)
  rng = np.random.default_rng(0)
  first, second = rng.integers(1, 64, 5), rng.integers(1, 64, 3)
  params = model.init(jax.random.key(0), first[None])["params"]
  packed = np.concatenate([first, second, [0, 0]])[None]
  segments = np.array([[1] * 5 + [2] * 3 + [0, 0]])
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
  logits = model.apply({"params": params}, packed, position_ids=positions, segment_ids=segments)
  alone = [model.apply({"params": params}, seq[None]) for seq in (first, second)]
  np.testing.assert_allclose(logits[0, :5], alone[0][0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:8], alone[1][0], atol=1e-5)
  with pytest.raises(ValueError, match="position_ids"):
    model.apply({"params": params}, packed, segment_ids=segments)
