"""DoRA against PEFT's own DoRA layers (Linear, Conv2d, Embedding): outputs, gradients, the dropout form, merging.

PEFT (``peft.tuners.lora.dora``) is the reference: the same weights go into a torch model wrapped by
``peft.get_peft_model(..., use_dora=True)`` and into the linen twin adapted by ``jlora.Lora``. The conformance
properties (every module kind, scan/remat/vmap, bf16, jit, nnx) are in tests/test_lora.py and tests/test_nnx.py;
interop with PEFT files on the reference models is in tests/test_peft.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from _cases import OneDense, assert_tolerance_rejects, np_dora_kernel
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
import jlora._lora
from jlora import quant, sharding

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RANK, ALPHA = 2, 6.0
SCALE = ALPHA / RANK
# float32 on both sides; PEFT forms W + s*B@A and its norm directly, jlora from ||W||^2, W^T A and the Gram.
TOL = dict(rtol=1e-5, atol=1e-5)


class TorchTrio(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(8, 6)
    self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    self.embed = torch.nn.Embedding(10, 6)


class Trio(nn.Module):
  """The linen twin: nn.Dense, an NHWC nn.Conv with the same geometry, nn.Embed."""

  @nn.compact
  def __call__(self, x, image, ids):
    return (nn.Dense(6, name="proj")(x), nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv")(image),
            nn.Embed(10, 6, name="embed")(ids))


RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 5, 8)).astype(np.float32)
IMAGE = RNG.normal(size=(2, 7, 8, 3)).astype(np.float32)  # NHWC; torch sees it as NCHW
IDS = np.array([[1, 2, 9, 0], [4, 4, 5, 7]], np.int64)
CONFIG = jlora.LoraConfig(targets=r"(proj|conv)/kernel|embed/embedding", rank=RANK, alpha=ALPHA, use_dora=True)


def _peft_trio(dropout=0.0, seed=0):
  """The PEFT DoRA model with random base weights and random (non-zero, trained-looking) adapters."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(TorchTrio(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                                           target_modules=["proj", "conv", "embed"], use_dora=True))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_magnitude" in name:
        param.mul_(torch.exp(0.3 * torch.randn_like(param)))  # around its init, the column norms
      elif "lora_" in name:
        param.copy_(0.5 * torch.randn_like(param))
  return model


def _numpy(t):
  return t.detach().numpy().astype(np.float32)


def _jlora_twin(peft_model):
  """(params, adapters) of the linen twin, with the PEFT model's weights."""
  m = peft_model.base_model.model
  proj, conv, embed = m.proj, m.conv, m.embed
  params = {"proj": {"kernel": _numpy(proj.base_layer.weight).T, "bias": _numpy(proj.base_layer.bias)},
            "conv": {"kernel": _numpy(conv.base_layer.weight).transpose(2, 3, 1, 0), "bias": _numpy(conv.base_layer.bias)},
            "embed": {"embedding": _numpy(embed.base_layer.weight)}}
  adapters = {
      "proj": {"kernel": {"lora_a": _numpy(proj.lora_A["default"].weight).T,
                          "lora_b": _numpy(proj.lora_B["default"].weight).T,
                          "lora_magnitude": _numpy(proj.lora_magnitude_vector["default"].weight)}},
      "conv": {"kernel": {"lora_a": _numpy(conv.lora_A["default"].weight).transpose(2, 3, 1, 0),
                          "lora_b": _numpy(conv.lora_B["default"].weight)[:, :, 0, 0].T,
                          "lora_magnitude": _numpy(conv.lora_magnitude_vector["default"].weight).reshape(-1)}},
      "embed": {"embedding": {"lora_a": _numpy(embed.lora_embedding_A["default"]).T,
                              "lora_b": _numpy(embed.lora_embedding_B["default"]).T,
                              "lora_magnitude": _numpy(embed.lora_magnitude_vector["default"].weight)}},
  }
  return params, adapters


def _torch_forward(peft_model):
  m = peft_model.base_model.model
  image = torch.from_numpy(IMAGE).permute(0, 3, 1, 2)
  return (m.proj(torch.from_numpy(X)), m.conv(image).permute(0, 2, 3, 1), m.embed(torch.from_numpy(IDS)))


_LORAS = {}


def _lora(**config):
  """The traced Lora of the twin (once per config)."""
  key = tuple(sorted(config.items()))
  if key not in _LORAS:
    lora = jlora.Lora(Trio(), dataclasses.replace(CONFIG, **config))
    lora.trace(jax.eval_shape(Trio().init, jax.random.key(0), X, IMAGE, IDS)["params"], X, IMAGE, IDS)
    _LORAS[key] = lora
  return _LORAS[key]


def test_outputs_and_gradients_equal_peft():
  peft_model = _peft_trio().eval()
  params, adapters = _jlora_twin(peft_model)
  lora = _lora()
  outputs = _torch_forward(peft_model)
  got = lora.apply(params, adapters, X, IMAGE, IDS)
  for name, theirs, ours in zip(("linear", "conv", "embedding"), outputs, got):
    np.testing.assert_allclose(np.asarray(ours), _numpy(theirs), **TOL, err_msg=name)
  base = Trio().apply({"params": params}, X, IMAGE, IDS)
  assert all(np.abs(np.asarray(b) - np.asarray(g)).max() > 1e-1 for b, g in zip(base, got))

  # The same loss, differentiated by torch through PEFT's detached norm and by JAX through jlora's.
  sum(o.square().sum() for o in outputs).backward()
  grads = jax.jit(jax.grad(lambda a: sum(jnp.sum(jnp.square(o)) for o in lora.apply(params, a, X, IMAGE, IDS))))(
      adapters)
  theirs = _jlora_twin_grads(peft_model)
  jax.tree.map(lambda ours, t: np.testing.assert_allclose(np.asarray(ours), t, rtol=1e-4, atol=1e-4), grads, theirs)
  # The gradient of m would differ by far more had the norm not been detached.
  undetached = jax.jit(jax.grad(lambda a: sum(jnp.sum(jnp.square(o)) for o in _undetached_apply(params, a))))(adapters)
  assert np.abs(np.asarray(undetached["proj"]["kernel"]["lora_a"] - theirs["proj"]["kernel"]["lora_a"])).max() > 1e-2


def _jlora_twin_grads(peft_model):
  """PEFT's gradients, laid out like jlora's adapter tree."""
  m = peft_model.base_model.model

  def g(param):
    return param.grad.numpy()

  return {
      "proj": {"kernel": {"lora_a": g(m.proj.lora_A["default"].weight).T, "lora_b": g(m.proj.lora_B["default"].weight).T,
                          "lora_magnitude": g(m.proj.lora_magnitude_vector["default"].weight)}},
      "conv": {"kernel": {"lora_a": g(m.conv.lora_A["default"].weight).transpose(2, 3, 1, 0),
                          "lora_b": g(m.conv.lora_B["default"].weight)[:, :, 0, 0].T,
                          "lora_magnitude": g(m.conv.lora_magnitude_vector["default"].weight).reshape(-1)}},
      "embed": {"embedding": {"lora_a": g(m.embed.lora_embedding_A["default"]).T,
                              "lora_b": g(m.embed.lora_embedding_B["default"]).T,
                              "lora_magnitude": g(m.embed.lora_magnitude_vector["default"].weight)}},
  }


def _undetached_apply(params, adapters):
  """DoRA through its merged kernel, the norm *not* detached: what detaching changes in the gradient."""
  lora = _lora()
  merged = {path: jlora.DORA.merge(params[path.split("/")[0]][path.split("/")[1]],
                                   adapters[path.split("/")[0]][path.split("/")[1]], t)[0]
            for path, t in lora.targets.items()}
  plain = {k: {**v, **{n: merged[f"{k}/{n}"] for n in v if f"{k}/{n}" in merged}} for k, v in params.items()}
  return Trio().apply({"params": plain}, X, IMAGE, IDS)


def test_dropout_form_equals_peft_with_the_same_mask(monkeypatch):
  """While dropout is active PEFT feeds dropout(x) to both extra terms (recomputing W dropout(x)); jlora does the
  same with the same mask: both sides' dropout is replaced by one fixed mask per input."""
  rate = 0.5
  peft_model = _peft_trio(dropout=rate, seed=1).train()
  params, adapters = _jlora_twin(peft_model)
  masks = {shape: RNG.random(shape) >= rate for shape in (X.shape, IMAGE.shape)}

  class FixedMask(torch.nn.Module):
    def forward(self, x):
      keep = masks[X.shape] if x.shape == X.shape else masks[IMAGE.shape].transpose(0, 3, 1, 2)
      return x * torch.from_numpy(keep) / (1 - rate)

  for module in (peft_model.base_model.model.proj, peft_model.base_model.model.conv):
    module.lora_dropout["default"] = FixedMask()
  monkeypatch.setattr(jlora._lora, "inverted_dropout",
                      lambda rng, p, x: jnp.where(masks[x.shape], x / (1 - p), 0).astype(x.dtype))
  lora = _lora(dropout=rate)
  got = lora.apply(params, adapters, X, IMAGE, IDS, rngs={"dropout": jax.random.key(0)})
  outputs = _torch_forward(peft_model)
  for name, theirs, ours in zip(("linear", "conv", "embedding"), outputs, got):
    np.testing.assert_allclose(np.asarray(ours), _numpy(theirs), **TOL, err_msg=name)
  # The form matters: the dropped input in the low-rank term only (the frozen term on x) is far off.
  p, a = params["proj"], adapters["proj"]["kernel"]
  w, v = p["kernel"].astype(np.float64), np.asarray(a["lora_a"]) @ np.asarray(a["lora_b"])
  g = a["lora_magnitude"] / np.linalg.norm(w + SCALE * v, axis=0)
  x_drop = X * masks[X.shape] / (1 - rate)
  wrong = X @ w + p["bias"] + (g - 1) * (X @ w) + g * SCALE * (x_drop @ v)
  assert_tolerance_rejects(_numpy(outputs[0]), {"dropout on the low-rank term only": wrong}, **TOL)


def test_merged_kernels_equal_peft_merge_and_unload():
  peft_model = _peft_trio(seed=2).eval()
  params, adapters = _jlora_twin(peft_model)
  merged = _lora().merge(params, adapters)
  plain = peft_model.merge_and_unload()
  np.testing.assert_allclose(merged["proj"]["kernel"], _numpy(plain.proj.weight).T, **TOL)
  np.testing.assert_allclose(merged["conv"]["kernel"], _numpy(plain.conv.weight).transpose(2, 3, 1, 0), **TOL)
  np.testing.assert_allclose(merged["embed"]["embedding"], _numpy(plain.embed.weight), **TOL)
  # ... and against the float64 re-derivation.
  lora = _lora()
  for path, target in lora.targets.items():
    module, name = path.split("/")
    want = np_dora_kernel(params[module][name], adapters[module][name], SCALE, target.layout)
    np.testing.assert_allclose(merged[module][name], want, **TOL)


def test_norm_report_measures_the_merged_update():
  """The safe-loading screen's ``||W' - W||`` for DoRA comes from column statistics; it equals the update a merge
  applies (float64 re-derivation)."""
  peft_model = _peft_trio(seed=3).eval()
  params, adapters = _jlora_twin(peft_model)
  lora = _lora()
  report = jlora.norm_report(lora, params, adapters)
  for row in report.rows:
    module, name = row.module.split("/")
    w = np.asarray(params[module][name], np.float64)
    update = np_dora_kernel(w, adapters[module][name], SCALE, lora.targets[row.module].layout) - w
    np.testing.assert_allclose(row.update_norm, np.linalg.norm(update), rtol=1e-5)
    np.testing.assert_allclose(row.weight_norm, np.linalg.norm(w), rtol=1e-6)


def test_adapter_checkpoint_round_trip_and_variant_check(tmp_path):
  model, x = OneDense(), X[..., :4]
  params = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(targets=r"proj/kernel", rank=RANK, alpha=ALPHA, use_dora=True)
  lora = jlora.Lora(model, config)
  adapters = jax.tree.map(lambda v: v + 0.1, lora.init(jax.random.key(1), params, x))
  summary = lora.summary(params, adapters)  # DoRA's trainable count includes its magnitudes
  assert summary.trainable == 4 * RANK + RANK * 5 + 5 and "variant: dora" in str(summary)
  jlora.save_adapters(tmp_path / "a", adapters, config, base_fingerprint=jlora.fingerprint(params))
  assert jlora.load_adapter_metadata(tmp_path / "a")["lora_config"] == config
  target = jax.eval_shape(lora.init, jax.random.key(1), params, x)
  restored, loaded = jlora.load_adapters(tmp_path / "a", target, params=params, lora=lora)
  assert loaded == config and loaded.use_dora
  jax.tree.map(np.testing.assert_array_equal, restored, adapters)
  # The stored config must describe the tree: a DoRA tree saved under a plain LoRA config is refused.
  plain = jlora.LoraConfig(targets=r"proj/kernel", rank=RANK, alpha=ALPHA)
  jlora.save_adapters(tmp_path / "b", adapters, plain, base_fingerprint=jlora.fingerprint(params))
  with pytest.raises(jlora.UnsafeAdapterError, match="lora_magnitude.*a lora adapter"):
    jlora.load_adapters(tmp_path / "b", target, params=params)


def test_sharded_dora_equals_unsharded():
  """adapter_specs splits DoRA's magnitude like the kernel's output axes (and each factor as for LoRA); a jitted
  apply over those shardings on 8 devices computes what one device does."""
  model = nn.Einsum((2, 4, 8), "btd,ndh->btnh", name="proj")
  x = RNG.normal(size=(4, 3, 4)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=RANK, alpha=ALPHA, use_dora=True))
  adapters = jax.tree.map(lambda v: v * 1.1 + 0.05, lora.init(jax.random.key(1), params, x))
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  specs = {"kernel": P("data", None, "tensor"), "bias": P("data", "tensor")}
  adapter_specs = sharding.adapter_specs(adapters, specs, lora.targets)
  assert adapter_specs == {"kernel": {"lora_a": P(None, None), "lora_b": P(None, "data", "tensor"),
                                      "lora_magnitude": P("data", "tensor")}}
  place = jax.tree.map(lambda s: NamedSharding(mesh, s), (specs, adapter_specs))
  sharded = jax.device_put((params, adapters), place)
  got = jax.jit(lambda p, a: lora.apply(p, a, x))(*sharded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(lora.apply(params, adapters, x)), rtol=1e-5, atol=1e-5)
  assert sharded[1]["kernel"]["lora_magnitude"].sharding.spec == P("data", "tensor")


def test_dora_over_a_quantized_base():
  """QDoRA: over a 4-bit base DoRA's norm and frozen term use the kernel as the module sees it, dequantized inside
  its call: the same outputs and gradients as DoRA over the dequantized float base."""
  model = nn.Dense(32, name="proj")
  x = RNG.normal(size=(2, 3, 64)).astype(np.float32)
  qparams = quant.quantize(model.init(jax.random.key(0), x)["params"], "kernel")
  floats = quant.dequantize(qparams)
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=RANK, alpha=ALPHA, use_dora=True))
  adapters = lora.init(jax.random.key(1), qparams, x)
  jax.tree.map(np.testing.assert_array_equal, adapters, lora.init(jax.random.key(1), floats, x))
  adapters = jax.tree.map(lambda v: v + 0.2 * jnp.asarray(RNG.normal(size=v.shape), v.dtype), adapters)

  def loss(a, p):
    return jnp.sum(jnp.square(lora.apply(p, a, x)))

  both = jax.jit(lambda a, q, f: (jax.value_and_grad(loss)(a, q), jax.value_and_grad(loss)(a, f)))
  for got, want in zip(*both(adapters, qparams, floats)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got, want)
  assert float(loss(adapters, qparams)) != float(jnp.sum(jnp.square(model.apply({"params": floats}, x))))
