"""jlora.quant.merge and jlora.peft.save_merged over a quantized base."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.peft
from jlora import models, quant

CONFIG = models.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
IDS = np.arange(12, dtype=np.int32).reshape(2, 6)


def _random_like(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: (scale * rng.standard_normal(v.shape)).astype(v.dtype), tree)


@pytest.fixture(scope="module")
def llama():
  """A small Llama, its attention projections in NF4, LoRA on q/v and the (float) LM head."""
  model = models.LlamaForCausalLM(CONFIG)
  params = _random_like(jax.eval_shape(model.init, jax.random.key(0), IDS)["params"], 0, 0.2)
  qparams = quant.quantize(params, r".*/(q_proj|k_proj|v_proj|o_proj)/kernel")
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/(q_proj|v_proj|lm_head)/kernel", rank=4, alpha=8.0))
  adapters = _random_like(jax.eval_shape(lora.init, jax.random.key(1), qparams, IDS), 1, 0.1)
  return model, params, qparams, lora, adapters


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


Q = "model/layers/self_attn/q_proj/kernel"
K = "model/layers/self_attn/k_proj/kernel"
HEAD = "lm_head/kernel"


def test_merge_dequantizes_and_folds_in_float32(llama):
  _, params, qparams, lora, adapters = llama
  exact = lora.merge(quant.dequantize(qparams, jnp.float32), adapters)  # the float32 merge, by Lora.merge
  merged = quant.merge(lora, qparams, adapters)
  assert not any(quant.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
  np.testing.assert_array_equal(_get(merged, Q), _get(exact, Q).astype(jnp.bfloat16))
  np.testing.assert_array_equal(_get(merged, K), _get(exact, K).astype(jnp.bfloat16))  # quantized, not adapted
  np.testing.assert_array_equal(_get(merged, HEAD), _get(exact, HEAD))  # a float kernel keeps its dtype
  kept = quant.merge(lora, qparams, adapters, dtype=None)
  np.testing.assert_array_equal(_get(kept, Q), _get(exact, Q))
  # The merged params compute what LoRA over the quantized base computes (up to bf16/f32 rounding).
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  served, trained = jax.jit(lambda kept, q, a: (lora.model.apply({"params": kept}, IDS), lora.apply(q, a, IDS)),
                            compiler_options=fast)(kept, qparams, adapters)
  chex.assert_trees_all_close(served, trained, atol=2e-4, rtol=0)


def test_requantized_merge_reports_its_error(llama):
  _, _, qparams, lora, adapters = llama
  requantized, report = quant.merge(lora, qparams, adapters, requantize=True)
  exact = lora.merge(quant.dequantize(qparams, jnp.float32), adapters)
  assert _get(requantized, K) is _get(qparams, K)  # not adapted: untouched
  q = _get(requantized, Q)
  assert quant.is_quantized(q) and (q.kind, q.block_size, q.double_quant) == ("nf4", 64, True)
  chex.assert_trees_all_equal(q, quant.quantize_array(_get(exact, Q), "nf4"))
  assert [row.path for row in report.rows] == [Q, "model/layers/self_attn/v_proj/kernel"]
  error = np.abs(np.asarray(q.dequantize(jnp.float32)) - np.asarray(_get(exact, Q)))
  row = report.rows[0]
  assert (row.max_abs_error, row.params) == (pytest.approx(float(error.max())), error.size)
  assert row.mean_abs_error == pytest.approx(float(error.mean()), rel=1e-5)
  assert 0 < report.mean_abs_error < report.max_abs_error == max(r.max_abs_error for r in report.rows)
  assert "max |err|" in str(report) and Q in str(report)
  assert not quant.is_quantized(_get(requantized, HEAD))


def test_save_merged_from_a_quantized_base(llama, tmp_path):
  model, _, qparams, lora, adapters = llama
  jlora.peft.save_merged(tmp_path, model, qparams, adapters, lora.config, IDS)
  _, loaded = models.from_pretrained(tmp_path)
  expected = lora.merge(quant.dequantize(qparams), adapters)
  chex.assert_trees_all_equal(loaded, expected)
