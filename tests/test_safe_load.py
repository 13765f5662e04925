"""Adapter safety checks: the safetensors reader, manifests, the norm report, and the orbax load path."""

import contextlib
import io
import json
import pickle
import re
import signal
import time
import tracemalloc
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
import jlora.peft
from jlora import models
from jlora._safety import read_safetensors

X = jnp.ones((2, 16), jnp.float32)


class TwoProj(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="v_proj")(jnp.tanh(nn.Dense(16, name="q_proj")(x)))


def random_like(tree, seed: int, scale: float = 0.1):
  """Random float32 numpy leaves shaped like ``tree`` (arrays or ShapeDtypeStructs): no compilation."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


def random_base_and_adapter(model, targets: str, rank: int, *inputs):
  """(params, lora, adapters) with random values (non-zero A and B), built without compiling the model."""
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"], seed=0)
  lora = jlora.Lora(model, jlora.LoraConfig(targets=targets, rank=rank, alpha=2.0 * rank))
  adapters = random_like(jax.eval_shape(lora.init, jax.random.key(1), params, *inputs), seed=1, scale=0.05)
  return params, lora, adapters


@pytest.fixture(scope="module")
def small():
  model = TwoProj()
  params, lora, adapters = random_base_and_adapter(model, r".*/kernel", 8, X)
  return model, params, lora, adapters


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
  config = models.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2)
  model = models.GPT2LMHeadModel(config)
  params, lora, adapters = random_base_and_adapter(model, r".*/(c_attn|c_fc)/kernel", 4, jnp.zeros((1, 4), jnp.int32))
  return model, params, lora.config, adapters


def _write(path, tensors, metadata=None):
  """A safetensors file from ``{name: (dtype, shape, raw bytes)}``, exactly as given (no validation)."""
  header, offset, chunks = {"__metadata__": metadata or {"format": "pt"}}, 0, []
  for name, (dtype, shape, raw) in tensors.items():
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header).encode()
  path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))
  return path


def _f32(*shape, fill=0.5):
  return ("F32", list(shape), np.full(shape, fill, np.float32).tobytes())


POLICY = jlora.LoadPolicy()


def test_reader_accepts_a_valid_file_and_checks_keys_and_shapes(tmp_path):
  path = _write(tmp_path / "a.safetensors", {"w": _f32(2, 3), "v": ("BF16", [4], b"\x80\x3f" * 4)})
  file = read_safetensors(path, POLICY, expected={"w": (2, 3), "v": (4,)})
  np.testing.assert_array_equal(file.tensors["w"], np.full((2, 3), 0.5, np.float32))
  assert file.tensors["v"].astype(np.float32).tolist() == [1.0] * 4
  with pytest.raises(jlora.UnsafeAdapterError, match=r"missing tensors \(1\): u.*unexpected tensors \(1\): v"):
    read_safetensors(path, POLICY, expected={"w": (2, 3), "u": (1,)})
  with pytest.raises(jlora.UnsafeAdapterError, match=r"'w' is \(2, 3\), expected \(3, 2\)"):
    read_safetensors(path, POLICY, expected={"w": (3, 2), "v": (4,)})


@pytest.mark.parametrize("dtype, raw", [("I64", np.zeros(6, np.int64).tobytes()), ("F64", np.zeros(6).tobytes()),
                                        ("BOOL", b"\x00" * 6), ("U8", b"\x00" * 6), ("O", b"\x00" * 6)])
def test_reader_refuses_other_dtypes(tmp_path, dtype, raw):
  path = _write(tmp_path / "a.safetensors", {"w": (dtype, [2, 3], raw)})
  with pytest.raises(jlora.UnsafeAdapterError, match=f"dtype '{dtype}'"):
    read_safetensors(path, POLICY)


@pytest.mark.parametrize("dtype", [{}, {"a": 1}, ["F32"], 32, None])
def test_reader_refuses_dtypes_that_are_not_names(tmp_path, dtype):  # found by tools.fuzz_adapters: once a TypeError
  path = _write(tmp_path / "a.safetensors", {"w": (dtype, [2, 3], bytes(24))})
  with pytest.raises(jlora.UnsafeAdapterError, match="is not a safetensors dtype name"):
    read_safetensors(path, POLICY)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_reader_refuses_non_finite_values(tmp_path, bad):
  values = np.ones((2, 3), np.float16)
  values[1, 2] = bad
  path = _write(tmp_path / "a.safetensors", {"w": ("F16", [2, 3], values.tobytes())})
  with pytest.raises(jlora.UnsafeAdapterError, match="'w' holds 1 non-finite"):
    read_safetensors(path, POLICY)


def test_reader_refuses_huge_declared_sizes_without_allocating(tmp_path):
  path = tmp_path / "a.safetensors"
  path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
  tracemalloc.start()
  with pytest.raises(jlora.UnsafeAdapterError, match="byte header, over the"):
    read_safetensors(path, POLICY)
  assert tracemalloc.get_traced_memory()[1] < 1 << 20
  tracemalloc.stop()
  path.write_bytes((4096).to_bytes(8, "little") + b"{}")
  with pytest.raises(jlora.UnsafeAdapterError, match="holds only 2 bytes"):
    read_safetensors(path, POLICY)
  huge = _write(tmp_path / "b.safetensors", {"w": ("F32", [2**40, 2**40], b"")})
  with pytest.raises(jlora.UnsafeAdapterError, match="needs .* bytes but data_offsets"):
    read_safetensors(huge, POLICY)
  big = _write(tmp_path / "c.safetensors", {"w": _f32(64, 64)})
  with pytest.raises(jlora.UnsafeAdapterError, match="over the 1,000-byte cap"):
    read_safetensors(big, jlora.LoadPolicy(max_file_bytes=1000))


def test_reader_refuses_untiled_offsets(tmp_path):
  header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
  encoded = json.dumps(header).encode()
  path = tmp_path / "a.safetensors"
  path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(12))
  with pytest.raises(jlora.UnsafeAdapterError, match="overlaps the previous tensor"):
    read_safetensors(path, POLICY)
  path.write_bytes(len(encoded).to_bytes(8, "little") + encoded.replace(b"[4, 12]", b"[8, 16]") + bytes(20))
  with pytest.raises(jlora.UnsafeAdapterError, match="cover 16 bytes but the data region holds 20"):
    read_safetensors(path, POLICY)
  dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
        b'"data_offsets": [0, 4]}}'
  path.write_bytes(len(dup).to_bytes(8, "little") + dup + bytes(4))
  with pytest.raises(jlora.UnsafeAdapterError, match="duplicate key 'a'"):
    read_safetensors(path, POLICY)


def test_pickles_are_never_read(tmp_path, gpt2_adapter):
  model, params, config, adapters = gpt2_adapter
  peft_dir = tmp_path / "peft"
  jlora.peft.save_pretrained(peft_dir, adapters, config, model, manifest=False)
  weights = peft_dir / "adapter_model.safetensors"
  for protocol in range(2, 6):
    weights.write_bytes(pickle.dumps({"w": np.ones(3)}, protocol=protocol))
    with pytest.raises(jlora.UnsafeAdapterError, match=f"is a pickle \\(protocol {protocol}\\)"):
      jlora.peft.from_pretrained(peft_dir, model, params)
  buffer = io.BytesIO()
  torch.save({"w": torch.ones(3)}, buffer)
  weights.write_bytes(buffer.getvalue())
  with pytest.raises(jlora.UnsafeAdapterError, match="zip archive"):
    jlora.peft.from_pretrained(peft_dir, model, params)
  weights.rename(peft_dir / "adapter_model.bin")
  with pytest.raises(jlora.UnsafeAdapterError, match=r"\['adapter_model.bin'\] are pickled checkpoints"):
    jlora.peft.from_pretrained(peft_dir, model, params)
  with pytest.raises(jlora.UnsafeAdapterError, match="jlora never unpickles"):
    jlora.peft.from_pretrained(peft_dir / "adapter_model.bin", model, params)


def test_manifest(tmp_path, gpt2_adapter):
  model, params, config, adapters = gpt2_adapter
  jlora.peft.save_pretrained(tmp_path / "a", adapters, config, model, params=params)
  assert sorted(jlora.verify_manifest(tmp_path / "a", required=True)) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
  weights = tmp_path / "a" / "adapter_model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-3] ^= 0x01  # one bit of one float: a valid file, but not the one that was written
  weights.write_bytes(bytes(data))
  with pytest.raises(jlora.UnsafeAdapterError, match="adapter_model.safetensors does not match its SHA-256"):
    jlora.peft.from_pretrained(tmp_path / "a", model, params)
  (tmp_path / "a" / "SHA256SUMS").unlink()
  jlora.peft.from_pretrained(tmp_path / "a", model, params)  # without a manifest, nothing detects the change
  with pytest.raises(jlora.UnsafeAdapterError, match="no SHA256SUMS manifest, and one is required"):
    jlora.peft.from_pretrained(tmp_path / "a", model, params, policy=jlora.LoadPolicy(require_manifest=True))
  (tmp_path / "a" / "SHA256SUMS").write_text(f"{'0' * 64}  ../etc/passwd\n")
  with pytest.raises(jlora.UnsafeAdapterError, match="relative path"):
    jlora.verify_manifest(tmp_path / "a")
  (tmp_path / "a" / "SHA256SUMS").write_text(f"{'0' * 64}  adapter_config.json\n")
  with pytest.raises(jlora.UnsafeAdapterError, match=r"does not cover \['adapter_model.safetensors'\]"):
    jlora.peft.from_pretrained(tmp_path / "a", model, params)


def test_norm_report_matches_the_formula_and_flags_outliers(small):
  _, params, lora, adapters = small
  report = jlora.norm_report(lora, params, adapters)
  for row in report.rows:
    node, kernel = adapters[row.module.split("/")[0]]["kernel"], params[row.module.split("/")[0]]["kernel"]
    delta = lora.targets[row.module].scale * np.asarray(node["lora_a"], np.float64) @ np.asarray(node["lora_b"])
    np.testing.assert_allclose(row.ratio, np.linalg.norm(delta) / np.linalg.norm(kernel), rtol=1e-5)
  assert not report.outliers
  blown = {**adapters, "v_proj": {"kernel": {**adapters["v_proj"]["kernel"],
                                             "lora_b": 1e3 * adapters["v_proj"]["kernel"]["lora_b"]}}}
  report = jlora.norm_report(lora, params, blown)
  assert [row.module for row in report.outliers] == ["v_proj/kernel"]
  assert "update larger than 1x the kernel" in str(report)


def test_peft_import_warns_or_refuses_norm_outliers(tmp_path, gpt2_adapter):
  model, params, config, adapters = gpt2_adapter
  node = adapters["transformer"]["h"]["mlp"]["c_fc"]["kernel"]
  lora_b = node["lora_b"] * np.array([1.0, 300.0], np.float32)[:, None, None]  # layer 1 only: one of four
  tampered = jax.tree.map(lambda x: x, adapters)
  tampered["transformer"]["h"]["mlp"]["c_fc"]["kernel"] = {**node, "lora_b": lora_b}
  jlora.peft.save_pretrained(tmp_path, tampered, config, model, params=params)
  with pytest.warns(jlora.AdapterNormWarning, match=r"transformer/h/mlp/c_fc/kernel\[1\]"):
    jlora.peft.from_pretrained(tmp_path, model, params)
  with pytest.raises(jlora.UnsafeAdapterError, match=r"1 of 4 modules have suspicious update norms.*c_fc/kernel\[1\]"):
    jlora.peft.from_pretrained(tmp_path, model, params, policy=jlora.LoadPolicy(strict=True))


# --- orbax --------------------------------------------------------------------------------------------


def test_orbax_restores_onto_a_named_sharding(tmp_path, small):
  _, params, lora, adapters = small
  jlora.save_adapters(tmp_path / "a", adapters, lora.config, base_fingerprint=jlora.fingerprint(params))
  mesh = jax.make_mesh((8,), ("x",))
  specs = {"lora_a": NamedSharding(mesh, P("x", None)), "lora_b": NamedSharding(mesh, P(None, "x"))}
  target = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=specs[p[-1].key]), adapters)
  restored, config = jlora.load_adapters(tmp_path / "a", target, params=params, lora=lora)
  assert config == lora.config
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    assert leaf.sharding == specs[path[-1].key] and len(leaf.sharding.device_set) == 8
    assert len({shard.data.shape for shard in leaf.addressable_shards}) == 1 and leaf.addressable_shards[0].data.size == 16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, adapters)
  # One sharding for every leaf, overriding the target's.
  replicated = NamedSharding(mesh, P())
  restored, _ = jlora.load_adapters(tmp_path / "a", jax.eval_shape(lambda: adapters), sharding=replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))


def test_orbax_load_goes_through_the_safety_checks(tmp_path, small):
  _, _, lora, adapters = small
  target = jax.eval_shape(lambda: adapters)
  jlora.save_adapters(tmp_path / "a", adapters, lora.config)
  data_file = next(p for p in (tmp_path / "a" / "adapters").rglob("*") if p.is_file() and "/d/" in p.as_posix())
  data_file.write_bytes(data_file.read_bytes() + b"\x00")
  with pytest.raises(jlora.UnsafeAdapterError, match="does not match its SHA-256 in SHA256SUMS"):
    jlora.load_adapters(tmp_path / "a", target)

  jlora.save_adapters(tmp_path / "b", adapters, lora.config)
  (tmp_path / "b" / "adapters" / "extra.pkl").write_bytes(pickle.dumps(1))
  with pytest.raises(jlora.UnsafeAdapterError, match="extra.pkl is a pickled checkpoint"):
    jlora.load_adapters(tmp_path / "b", target)

  jlora.save_adapters(tmp_path / "c", adapters, lora.config, manifest=False)
  (tmp_path / "c" / "jlora_adapter.json").write_text('{"format": "jlora-adapter/1", "format": "x"}')
  with pytest.raises(jlora.UnsafeAdapterError, match="duplicate key 'format'"):
    jlora.load_adapters(tmp_path / "c", target)
  with pytest.raises(jlora.UnsafeAdapterError, match="no SHA256SUMS manifest"):
    jlora.load_adapters(tmp_path / "c", target, policy=jlora.LoadPolicy(require_manifest=True))

  poisoned = jax.tree.map(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), adapters)
  jlora.save_adapters(tmp_path / "d", poisoned, lora.config)
  with pytest.raises(jlora.UnsafeAdapterError, match=r"NaN/inf values in \['q_proj/kernel/lora_a \(1 values\)'"):
    jlora.load_adapters(tmp_path / "d", target)

  ints = jax.tree.map(lambda x: x.astype(jnp.int32), adapters)
  jlora.save_adapters(tmp_path / "e", ints, lora.config)
  with pytest.raises(jlora.UnsafeAdapterError, match="dtype other than float16/bfloat16/float32"):
    jlora.load_adapters(tmp_path / "e", jax.eval_shape(lambda: ints))


def test_orbax_norm_report_warns_or_refuses(tmp_path, small):
  _, params, lora, adapters = small
  blown = jax.tree_util.tree_map_with_path(lambda p, x: 1e3 * x if p[0].key == "q_proj" else x, adapters)
  jlora.save_adapters(tmp_path / "a", blown, lora.config, base_fingerprint=jlora.fingerprint(params))
  target = jax.eval_shape(lambda: adapters)
  with pytest.warns(jlora.AdapterNormWarning, match="q_proj/kernel"):
    jlora.load_adapters(tmp_path / "a", target, params=params, lora=lora)
  with pytest.raises(jlora.UnsafeAdapterError, match="q_proj/kernel: ratio"):
    jlora.load_adapters(tmp_path / "a", target, params=params, lora=lora, policy=jlora.LoadPolicy(strict=True))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jlora.save_adapters(tmp_path / "b", adapters, lora.config, base_fingerprint=jlora.fingerprint(params))
    jlora.load_adapters(tmp_path / "b", target, params=params, lora=lora)


# --- a stored fingerprint that was deleted, renamed or never written ------------------------------------

ALLOW_NO_FINGERPRINT = jlora.LoadPolicy(allow_missing_fingerprint=True)


def _edit_safetensors_metadata(path, edit):
  """Rewrites the ``__metadata__`` of a safetensors file with ``edit(dict) -> dict``; tensors stay byte for byte."""
  data = path.read_bytes()
  length = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + length])
  header["__metadata__"] = edit(header["__metadata__"])
  encoded = json.dumps(header).encode()
  path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])


@pytest.mark.parametrize("edit", ["deleted", "renamed", "never written"])
def test_peft_file_without_fingerprint_is_refused_onto_a_base(tmp_path, gpt2_adapter, edit):
  model, params, config, adapters = gpt2_adapter
  # Without a manifest, as a PEFT directory is (or after an attacker removed it): only the base check is left.
  jlora.peft.save_pretrained(tmp_path, adapters, config, model, params=None if edit == "never written" else params,
                             manifest=False)
  weights = tmp_path / "adapter_model.safetensors"
  if edit == "deleted":
    _edit_safetensors_metadata(weights, lambda m: {k: v for k, v in m.items() if k != "jlora_base_fingerprint"})
  elif edit == "renamed":
    _edit_safetensors_metadata(weights, lambda m: {k.replace("fingerprint", "fingerprinX"): v for k, v in m.items()})
  with pytest.raises(jlora.UnsafeAdapterError, match="stores no base fingerprint") as refused:
    jlora.peft.from_pretrained(tmp_path, model, params)
  message = str(refused.value)
  assert "PEFT's own save_pretrained writes none" in message and "LoadPolicy.allow_missing_fingerprint" in message
  with pytest.raises(jlora.UnsafeAdapterError, match="stores no base fingerprint"):
    jlora.peft.from_pretrained(tmp_path, model, params, policy=jlora.LoadPolicy(strict=True))
  # An explicit expectation is not waived by the allowance.
  with pytest.raises(jlora.UnsafeAdapterError, match="stores base fingerprint None, expected"):
    jlora.peft.from_pretrained(tmp_path, model, params, policy=ALLOW_NO_FINGERPRINT,
                               expected_fingerprint=jlora.peft.base_fingerprint(model, params))
  loaded, _ = jlora.peft.from_pretrained(tmp_path, model, params, policy=ALLOW_NO_FINGERPRINT)
  jax.tree.map(np.testing.assert_array_equal, loaded, adapters)


def test_orbax_adapter_without_fingerprint_is_refused_onto_a_base(tmp_path, small):
  _, params, lora, adapters = small
  target = jax.eval_shape(lambda: adapters)
  fp = jlora.fingerprint(params)
  jlora.save_adapters(tmp_path / "stripped", adapters, lora.config, base_fingerprint=fp, manifest=False)
  metadata_file = tmp_path / "stripped" / "jlora_adapter.json"
  metadata_file.write_text(json.dumps({**json.loads(metadata_file.read_text()), "base_fingerprint": None}))
  jlora.save_adapters(tmp_path / "never", adapters, lora.config)
  for name in ("stripped", "never"):
    for base in (dict(params=params), dict(base_fingerprint=fp), dict(params=params, lora=lora)):
      with pytest.raises(jlora.UnsafeAdapterError, match=r"stores no base fingerprint \("
                                                         r'"base_fingerprint" is null.*allow_missing_fingerprint'):
        jlora.load_adapters(tmp_path / name, target, **base)
    loaded, _ = jlora.load_adapters(tmp_path / name, target, params=params, policy=ALLOW_NO_FINGERPRINT)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    loaded, _ = jlora.load_adapters(tmp_path / name, target)  # no base given: nothing to check it against
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
  # Deleting the key altogether is a malformed metadata file.
  metadata_file.write_text(json.dumps({k: v for k, v in json.loads(metadata_file.read_text()).items()
                                       if k != "base_fingerprint"}))
  with pytest.raises(jlora.UnsafeAdapterError, match="has keys"):
    jlora.load_adapters(tmp_path / "stripped", target, params=params, policy=ALLOW_NO_FINGERPRINT)


def test_bfloat16_adapters_round_trip_through_peft_files(tmp_path, gpt2_adapter):
  model, params, config, adapters = gpt2_adapter
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), adapters)
  jlora.peft.save_pretrained(tmp_path, bf16, config, model, params=params)
  loaded, loaded_config = jlora.peft.from_pretrained(tmp_path, model, params)
  assert loaded_config.dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, bf16)


# --- regexes that backtrack catastrophically ----------------------------------------------------------

# Each pattern next to a module path it backtracks on exponentially (or with a degree-25 polynomial): with
# 64 a's, (a+)+$ and (a|aa)+b take longer than the universe's age in Python's re; (.*a){25} tries about
# C(70, 25) splits; the last one hangs on an ordinary module name of the test model.
PATHOLOGICAL = {
    "(a+)+$": "a" * 64 + ".q_proj",
    "(a|aa)+b": "a" * 64 + ".q_proj",
    "(.*a){25}": "a" * 64 + ".q_proj",
    r"(\w+\.?)+!": "model.layers.0.self_attn.q_proj",
}
# A refusal takes milliseconds; this bound only has to survive a loaded 2-core machine.
REFUSAL_SECONDS = 10.0


@contextlib.contextmanager
def _deadline(seconds: float):
  """Raises TimeoutError in the main thread after ``seconds`` (Python's re checks for signals while matching)."""

  def expire(*_):
    raise TimeoutError(f"still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_the_patterns_really_backtrack_catastrophically():
  for pattern, path in PATHOLOGICAL.items():
    for match in (re.fullmatch, lambda p, s: re.match(rf"(.*\.)?({p})$", s)):  # jlora/PEFT's two matching forms
      with pytest.raises(TimeoutError), _deadline(0.25):
        match(pattern, path)


def _refused_quickly(load, field: str) -> None:
  start = time.perf_counter()
  with pytest.raises(jlora.UnsafeAdapterError, match=f"{re.escape(field)}.*backtrack catastrophically"), \
       _deadline(REFUSAL_SECONDS):
    load()
  assert time.perf_counter() - start < REFUSAL_SECONDS


@pytest.mark.parametrize("pattern", sorted(PATHOLOGICAL))
def test_backtracking_regexes_in_config_files_are_refused_quickly(pattern, tmp_path, gpt2_adapter, small, capsys):
  from jlora import cli

  model, params, config, adapters = gpt2_adapter
  peft_dir = tmp_path / "peft"
  jlora.peft.save_pretrained(peft_dir, adapters, config, model, params=params, manifest=False)
  valid = json.loads((peft_dir / "adapter_config.json").read_text())
  edits = {"target_modules": {"target_modules": pattern}, "exclude_modules": {"exclude_modules": pattern},
           "rank_pattern": {"rank_pattern": {pattern: 2}}, "alpha_pattern": {"alpha_pattern": {pattern: 3}},
           "layers_pattern": {"layers_pattern": pattern, "layers_to_transform": [0]}}
  for field, edit in edits.items():
    (peft_dir / "adapter_config.json").write_text(json.dumps({**valid, **edit}))
    _refused_quickly(lambda: jlora.peft.from_pretrained(peft_dir, model, params), field)

  _, small_params, lora, small_adapters = small
  jlora_dir = tmp_path / "jlora"
  jlora.save_adapters(jlora_dir, small_adapters, lora.config, base_fingerprint=jlora.fingerprint(small_params),
                      manifest=False)
  metadata = json.loads((jlora_dir / "jlora_adapter.json").read_text())
  target = jax.eval_shape(lambda: small_adapters)
  for field, edit in {"targets": [pattern], "rank_pattern": {pattern: 8}, "alpha_pattern": {pattern: 3.0}}.items():
    edited = {**metadata, "lora_config": {**metadata["lora_config"], field: edit}}
    (jlora_dir / "jlora_adapter.json").write_text(json.dumps(edited))
    _refused_quickly(lambda: jlora.load_adapters(jlora_dir, target, params=small_params, lora=lora),
                     f"lora_config.{field}")
    _refused_quickly(lambda: jlora.load_adapter_metadata(jlora_dir), f"lora_config.{field}")

  # The CLI's validate, on the PEFT adapter and its base saved as a Hugging Face checkpoint.
  models.save_pretrained(tmp_path / "base", model, params)
  (peft_dir / "adapter_config.json").write_text(json.dumps({**valid, "target_modules": pattern}))
  start = time.perf_counter()
  with _deadline(REFUSAL_SECONDS):
    assert cli.main(["validate", str(peft_dir), "--base", str(tmp_path / "base")]) == 1
  assert time.perf_counter() - start < REFUSAL_SECONDS
  assert "target_modules" in capsys.readouterr().err


# --- a jlora_adapter.json whose LoraConfig was edited (no manifest to catch it) -------------------------


@pytest.mark.parametrize("field, value, message", [
    ("rank_pattern", 2, r"lora_config.rank_pattern=2 must be \{regex: positive int\}"),  # once a TypeError
    ("targets", 5, "must be a regex or a non-empty list of regexes"),
    ("targets", [], "must be a regex or a non-empty list of regexes"),
    ("alpha", "16", "must be a finite number"),
    ("alpha", True, "must be a finite number"),
    ("use_rslora", "yes", "must be true or false"),
    ("dropout", 1.5, r"must be a number in \[0, 1\)"),
    ("dtype", "float64", "must be 'float32', 'bfloat16' or 'float16'"),
    ("alpha_pattern", {"q.*": None}, "finite number"),
    ("rank", None, r"lora_config has keys"),  # deleted: the default rank 8 would no longer describe the tensors
])
def test_edited_stored_config_is_refused(tmp_path, small, field, value, message):
  _, params, lora, adapters = small
  jlora.save_adapters(tmp_path, adapters, lora.config, base_fingerprint=jlora.fingerprint(params), manifest=False)
  metadata = json.loads((tmp_path / "jlora_adapter.json").read_text())
  config = {**metadata["lora_config"], field: value}
  if value is None and field == "rank":
    del config["rank"]
  (tmp_path / "jlora_adapter.json").write_text(json.dumps({**metadata, "lora_config": config}))
  with pytest.raises(jlora.UnsafeAdapterError, match=message):
    jlora.load_adapters(tmp_path, jax.eval_shape(lambda: adapters), params=params, lora=lora)


def test_stored_config_must_describe_the_saved_adapters(tmp_path, small):
  """A well-formed but edited LoraConfig: the ranks must be the tensors', and a given lora's targets and scales."""
  _, params, lora, adapters = small
  target = jax.eval_shape(lambda: adapters)
  jlora.save_adapters(tmp_path, adapters, lora.config, base_fingerprint=jlora.fingerprint(params), manifest=False)
  metadata = json.loads((tmp_path / "jlora_adapter.json").read_text())

  def stored(**edit):
    (tmp_path / "jlora_adapter.json").write_text(json.dumps({**metadata, "lora_config": {**metadata["lora_config"],
                                                                                          **edit}}))

  stored(rank=4)  # the tensors have rank 8
  with pytest.raises(jlora.UnsafeAdapterError, match=r"q_proj/kernel has rank 8, the config says 4"):
    jlora.load_adapters(tmp_path, target)
  stored(targets=[r"q_proj/kernel"])
  with pytest.raises(jlora.UnsafeAdapterError, match=r"v_proj/kernel is not a target"):
    jlora.load_adapters(tmp_path, target)
  stored(alpha=17.0)  # ranks still fit; only the caller's lora can tell the scale is not what it computes with
  _, config = jlora.load_adapters(tmp_path, target)
  assert config.alpha == 17.0
  with pytest.raises(jlora.UnsafeAdapterError, match=r"q_proj/kernel gets scale 2.125, the given lora's is 2.0"):
    jlora.load_adapters(tmp_path, target, params=params, lora=lora)
  stored(targets=[r"(q|v)_proj/kernel"])  # the same kernels, written another way: fine
  jlora.load_adapters(tmp_path, target, params=params, lora=lora)


def test_peft_layers_pattern_must_be_regexes(tmp_path, gpt2_adapter):
  model, params, config, adapters = gpt2_adapter
  jlora.peft.save_pretrained(tmp_path, adapters, config, model, params=params, manifest=False)
  valid = json.loads((tmp_path / "adapter_config.json").read_text())
  for value in (5, {"h": 1}, [1]):
    (tmp_path / "adapter_config.json").write_text(json.dumps({**valid, "layers_pattern": value}))
    with pytest.raises(jlora.UnsafeAdapterError, match="layers_pattern=.* must be a regex or a list of regexes"):
      jlora.peft.from_pretrained(tmp_path, model, params)
