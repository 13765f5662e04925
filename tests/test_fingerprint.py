"""jlora.fingerprint of a quantized base: what it stores (format, codes, statistics), and adapters checked against it.

A quantized base deliberately does not share the fingerprint of the float weights it was quantized from (an
adapter trained over NF4 weights learnt around their quantization error); quantizing again gives it back.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant, sharding

X = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
TARGETS = r"(up|down)/kernel"


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name="down")(jax.nn.gelu(nn.Dense(256, name="up")(x)))


@pytest.fixture(scope="module")
def base():
  model = Mlp()
  shapes = jax.eval_shape(model.init, jax.random.key(0), X)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return model, params


def test_a_quantized_kernel_is_fingerprinted_by_what_it_stores(base):
  _, params = base
  up = "up/kernel"
  qparams = quant.quantize(params, up)
  fp = jlora.fingerprint(qparams)
  assert fp == jlora.fingerprint(quant.quantize(params, up))  # deterministic: quantize again, same base
  gguf_up = {**params, "up": {**params["up"], "kernel": quant.quantize_gguf(params["up"]["kernel"], "q4_1")}}
  others = {
      "float": params,
      "dequantized": quant.dequantize(qparams),
      "fp4": quant.quantize(params, up, kind="fp4"),
      "no double quantization": quant.quantize(params, up, double_quant=False),
      "from bfloat16": quant.quantize(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), up),
      "one code changed": _edit(qparams, codes=lambda c: c.at[0, 0].set(c[0, 0] ^ 1)),
      "one statistic changed": _edit(qparams, absmax=lambda a: a.at[0, 0].set(a[0, 0] ^ 1)),
      "q4_1": gguf_up,
      "q4_1, one scale changed": _edit(gguf_up, scales=lambda s: s.at[0, 0].set(-s[0, 0])),
      "q4_1 as q4_0": _edit(gguf_up, ggml_type=lambda t: "q4_0"),
  }
  fingerprints = {name: jlora.fingerprint(tree) for name, tree in others.items()}
  assert fp not in fingerprints.values() and len(set(fingerprints.values())) == len(fingerprints), fingerprints


def _edit(tree, **fields):
  """``tree`` with fields of its quantized ``up/kernel`` replaced by ``fn(field)``."""
  kernel = tree["up"]["kernel"]
  changed = dataclasses.replace(kernel, **{name: fn(getattr(kernel, name)) for name, fn in fields.items()})
  return {**tree, "up": {**tree["up"], "kernel": changed}}


def test_sharded_quantized_base_has_the_fingerprint_of_the_whole_one(base):
  model, params = base
  qparams = quant.quantize(params, TARGETS)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  rules = [(r".*/kernel", jax.sharding.PartitionSpec("fsdp", "tensor")), (r".*", jax.sharding.PartitionSpec())]
  sharded = jax.device_put(qparams, sharding.named(sharding.param_specs(qparams, rules, mesh), mesh))
  assert len(sharded["up"]["kernel"].codes.sharding.device_set) == 8
  assert jlora.fingerprint(sharded) == jlora.fingerprint(qparams)


def test_adapter_trained_over_a_quantized_base_loads_checked_against_it(base, tmp_path):
  model, params = base
  qparams = quant.quantize(params, TARGETS)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=TARGETS, rank=4))
  adapters = jax.tree.map(lambda v: v + 0.01, lora.init(jax.random.key(2), qparams, X))
  jlora.save_adapters(tmp_path / "a", adapters, lora.config, base_fingerprint=jlora.fingerprint(qparams))
  target = jax.eval_shape(lambda: adapters)
  # Later: the same base quantized again, checked by its fingerprint and by the norm report.
  again = quant.quantize(params, TARGETS)
  restored, config = jlora.load_adapters(tmp_path / "a", target, params=again, lora=lora)
  chex.assert_trees_all_equal(restored, adapters)
  # The float weights are another base: refused, unless checked through their quantization.
  with pytest.raises(jlora.UnsafeAdapterError, match="different base model"):
    jlora.load_adapters(tmp_path / "a", target, params=params)
  jlora.load_adapters(tmp_path / "a", target, base_fingerprint=jlora.fingerprint(quant.quantize(params, TARGETS)))
  with pytest.raises(jlora.UnsafeAdapterError, match="different base model"):
    jlora.load_adapters(tmp_path / "a", target,
                        base_fingerprint=jlora.fingerprint(quant.quantize(params, TARGETS, kind="fp4")))
