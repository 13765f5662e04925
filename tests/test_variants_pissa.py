"""PiSSA / OLoRA: factors and residual against PEFT's own initialisations, and the conversion to plain LoRA.

The conformance properties (every module kind, scan/remat/vmap, identity at init, merging, nnx) are in
tests/test_lora.py and tests/test_nnx.py; PEFT files both ways on a reference model are in tests/test_peft.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jlora
from jlora import quant

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RANK, ALPHA = 2, 6.0
SCALE = ALPHA / RANK


class TorchProj(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(8, 6)


def _peft_init(init: str, weight: np.ndarray):
  """PEFT's factors and residual for a torch Linear holding ``weight`` (``(out, in)``): ``(s B@A, W_res)``."""
  module = TorchProj()
  with torch.no_grad():
    module.proj.weight.copy_(torch.from_numpy(weight))
  model = peft.get_peft_model(module, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                                      init_lora_weights=init))
  layer = model.base_model.model.proj
  a, b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
  return SCALE * b.astype(np.float64) @ a, layer.base_layer.weight.detach().numpy()


def _jlora_init(init: str, kernel: np.ndarray, key=1):
  model = nn.Dense(6, name="proj")
  x = np.ones((1, 8), np.float32)
  params = {"kernel": kernel, "bias": np.zeros(6, np.float32)}
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=RANK, alpha=ALPHA, init=init))
  residual, adapters = lora.init_with_base(jax.random.key(key), params, x)
  a, b = (np.asarray(adapters["kernel"][n], np.float64) for n in ("lora_a", "lora_b"))
  return SCALE * a @ b, np.asarray(residual["kernel"])


def _spectral_gap_matrix(seed=0):
  """A (6, 8) weight with singular values 5, 4, 1, 0.5, 0.2, 0.1: a clear gap after the rank-2 part."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  v, _ = np.linalg.qr(rng.normal(size=(8, 6)))
  return (u * np.array([5.0, 4.0, 1.0, 0.5, 0.2, 0.1])) @ v.T


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_peft(init):
  """With the same weight, s*A@B and the residual base equal PEFT's (both are sign-invariant products, so the SVD /
  QR routines' sign choices do not matter)."""
  weight = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
  theirs_delta, theirs_residual = _peft_init(init, weight)
  ours_delta, ours_residual = _jlora_init(init, weight.T.copy())
  np.testing.assert_allclose(ours_delta, theirs_delta.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_residual, theirs_residual.T, rtol=1e-5, atol=1e-5)
  assert np.abs(ours_delta).max() > 0.1


def test_randomized_svd_converges_like_peft():
  """pissa_niter_K draws its own Gaussian test matrix (JAX cannot replay torch's), so the factors are compared by
  what they approximate: with a spectral gap both land on the rank-2 truncation, within 1e-4."""
  weight = _spectral_gap_matrix().astype(np.float32)
  u, s, vh = np.linalg.svd(weight.astype(np.float64))
  truncation = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
  theirs, _ = _peft_init("pissa_niter_4", weight)
  np.testing.assert_allclose(theirs, truncation, atol=1e-4)
  for key in (1, 2):
    ours, residual = _jlora_init("pissa_niter_4", weight.T.copy(), key=key)
    np.testing.assert_allclose(ours, truncation.T, atol=1e-4)
    np.testing.assert_allclose(residual + ours, weight.T, atol=1e-5)
  # Without subspace iterations the same test matrix is visibly off: the iterations are what converge.
  rough, _ = _jlora_init("pissa_niter_0", weight.T.copy())
  assert np.abs(rough - truncation.T).max() > 1e-3


def test_rank_above_the_kernel_is_refused():
  model = nn.Dense(3)
  x = np.ones((1, 2), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4, init="pissa"))
  with pytest.raises(jlora.JloraError, match=r"rank 4 exceeds min\(fan_in, fan_out\) = 2"):
    lora.init_with_base(jax.random.key(0), params, x)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_plain_lora_conversion_applies_to_the_original_base(init, use_rslora):
  """residual + trained PiSSA adapter == original base + the rank-2r plain LoRA, with patterns and rsLoRA."""

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="out")(jnp.tanh(nn.Dense(6, name="hidden")(x)))

  model, x = Two(), np.random.default_rng(2).normal(size=(3, 7)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets=r".*/kernel", rank=3, alpha=4.0, init=init, use_rslora=use_rslora,
                            rank_pattern={r"out/kernel": 2}, alpha_pattern={r"out/kernel": 5.0})
  lora = jlora.Lora(model, config)
  residual, initial = lora.init_with_base(jax.random.key(1), params, x)
  rng = np.random.default_rng(3)
  trained = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(np.float32), initial)
  adapted = lora.apply(residual, trained, x)
  plain, plain_config = lora.to_plain_lora(trained, initial)
  factor = np.sqrt(2.0) if use_rslora else 2.0
  assert plain_config == dataclasses.replace(config, rank=6, alpha=factor * 4.0, init="kaiming_uniform",
                                             rank_pattern={r"out/kernel": 4}, alpha_pattern={r"out/kernel": factor * 5.0})
  converted = jlora.Lora(model, plain_config)
  np.testing.assert_allclose(converted.apply(params, plain, x), adapted, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(adapted) - np.asarray(model.apply({"params": params}, x))).max() > 1e-2
  for path, target in converted.trace(params, x).items():
    assert target.scale == pytest.approx(lora.targets[path].scale)
  with pytest.raises(jlora.JloraError, match="already apply to the original base"):
    converted.to_plain_lora(plain, plain)


def test_residual_of_a_quantized_kernel_is_requantized():
  """QPiSSA: PiSSA on a quantized base factors the dequantized kernel and stores the residual W - s*A@B in the
  kernel's own format, so the frozen side stays quantized (dequantized, it is the residual up to NF4 error)."""
  model = nn.Dense(64, name="proj")
  x = np.random.default_rng(4).normal(size=(2, 128)).astype(np.float32)
  params = quant.quantize(model.init(jax.random.key(0), x)["params"], "kernel")
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=4, alpha=4.0, init="pissa"))
  residual, adapters = lora.init_with_base(jax.random.key(1), params, x)
  assert quant.is_quantized(residual["kernel"]) and residual["kernel"].kind == params["kernel"].kind
  w = np.asarray(params["kernel"].dequantize(), np.float64)
  node = adapters["kernel"]
  want = w - 1.0 * np.asarray(node["lora_a"], np.float64) @ np.asarray(node["lora_b"], np.float64)
  stored = np.asarray(residual["kernel"].dequantize(), np.float64)
  assert np.abs(stored - want).max() < 0.5 * np.abs(stored - w).max(), "the residual, not the kernel, is stored"
  # The adapted model computes from that stored residual plus s*A@B.
  merged = (stored + (w - want)).astype(np.float32)
  np.testing.assert_allclose(lora.apply(residual, adapters, x), model.apply({"params": {**params, "kernel": merged}}, x),
                             rtol=1e-5, atol=1e-5)
