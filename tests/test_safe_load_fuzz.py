"""Fuzzing every adapter load path: damaged or hostile files are refused, or load exactly what was written.

Two parts. The seeded campaign of ``tools.fuzz_adapters`` (its full run is ``python -m tools.fuzz_adapters
--mutations 1200 --seed 0``; a fixed subset runs here) mutates a PEFT and a jlora adapter directory anywhere
(bit flips, overwrites, truncations, insertions and deletions of bytes, JSON edits of ``adapter_config.json``,
``jlora_adapter.json``, orbax's metadata, the safetensors header and its ``__metadata__``, and the
``SHA256SUMS`` manifest) and loads each copy through ``jlora.peft.from_pretrained``, ``jlora.load_adapters``
and the CLI's ``validate``: each must be refused with ``jlora.UnsafeAdapterError`` or load a result the
campaign proves allowed (``tools/fuzz_adapters/_campaign.py`` defines "identical" and the rest). Then a
hand-written list of hostile PEFT files (truncations, header corruption, forbidden dtypes, NaN/inf, extra,
missing and mis-shaped tensors, huge declared sizes, pickles and torch.save archives, random bytes, damaged
configs): every one refused, no other exception, no acceptance. Seeded.
"""

import io
import json
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_safe_load import random_base_and_adapter

import jlora
import jlora.peft
from jlora import models
from tools import fuzz_adapters

SEED = 20240611
CAMPAIGN_MUTATIONS = 80  # the full campaign runs 1,200 and more as a script
IDS = jnp.zeros((1, 4), jnp.int32)
WEIGHTS, CONFIG, MANIFEST = "adapter_model.safetensors", "adapter_config.json", "SHA256SUMS"


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
  return fuzz_adapters.build(tmp_path_factory.mktemp("subjects"))


# When orbax/tensorstore fails to read a damaged checkpoint, a tensorstore callback later finds orbax's event loop
# closed; Python reports that as an unraisable exception in a background thread. The load itself raised
# UnsafeAdapterError, which is what the campaign checks.
@pytest.mark.filterwarnings("ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")
def test_campaign_subset(subjects, tmp_path):
  order = fuzz_adapters.plan(CAMPAIGN_MUTATIONS, SEED)
  results = [fuzz_adapters.run_one(subjects, index, cell, SEED, tmp_path) for index, cell in enumerate(order)]
  failures = [r for r in results if r.failed]
  assert not failures, "\n".join(f"#{r.index} {r.path}/{r.kind}/{r.mode} {r.mutation}: {r.outcome}: {r.detail}"
                                  for r in failures[:20])
  table = fuzz_adapters.summary(results)
  assert set(table) == {"/".join(cell) for cell in fuzz_adapters.CELLS} | {"total"}, table
  assert all(row.get("refused", 0) > 0 for row in table.values()), table  # every path and mode refuses something


def test_flipping_any_bit_of_the_fingerprint_key_is_refused(subjects, tmp_path):
  """Renaming the fingerprint's metadata key by one bit must not switch the base check off (no manifest)."""
  results = fuzz_adapters.metadata_span_flips(subjects, tmp_path, within=b'"jlora_base_fingerprint"')
  assert len(results) == 8 * len(b'"jlora_base_fingerprint"')
  assert {r.outcome for r in results} == {"refused"}, [(r.mutation, r.outcome) for r in results if r.failed][:10]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
  config = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
  model = models.LlamaForCausalLM(config)
  params, lora, adapters = random_base_and_adapter(model, r".*/(q_proj|v_proj)/kernel", 2, IDS)
  directory = tmp_path_factory.mktemp("valid")
  jlora.peft.save_pretrained(directory, adapters, lora.config, model, params=params)
  jlora.peft.from_pretrained(directory, model, params)  # the unmutated adapter loads
  return model, params, directory


def _header(data: bytes) -> tuple[int, dict]:
  length = int.from_bytes(data[:8], "little")
  return length, json.loads(data[8:8 + length])


def _pack(header: dict, payload: bytes) -> bytes:
  encoded = json.dumps(header).encode()
  return len(encoded).to_bytes(8, "little") + encoded + payload


def _rebuild(tensors: dict, metadata: dict, dtypes: dict | None = None) -> bytes:
  """A consistent safetensors file from ``{name: ndarray}`` (raw dtype names override via ``dtypes``)."""
  header, chunks, offset = {"__metadata__": metadata}, [], 0
  for name, array in tensors.items():
    raw = np.ascontiguousarray(array).tobytes()
    dtype = (dtypes or {}).get(name, {"float32": "F32", "float16": "F16"}.get(array.dtype.name, "F32"))
    header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  return _pack(header, b"".join(chunks))


def _mutations(valid_bytes: bytes, rng: np.random.Generator):
  """Yields ``(description, mutated weights bytes)``; none may load."""
  length, header = _header(valid_bytes)
  metadata = header.pop("__metadata__")
  names = sorted(header)
  original = {name: np.frombuffer(valid_bytes, np.float32, int(np.prod(header[name]["shape"])),
                                  8 + length + header[name]["data_offsets"][0]).reshape(header[name]["shape"])
              for name in names}
  raw_header = valid_bytes[8:8 + length]
  meta_start = raw_header.index(b'"__metadata__"')
  meta_end = raw_header.index(b"}", meta_start) + 1

  for _ in range(40):
    cut = int(rng.integers(0, len(valid_bytes)))
    yield f"truncated to {cut} bytes", valid_bytes[:cut]
  flippable = [i for i in range(len(raw_header)) if not meta_start <= i < meta_end]
  for _ in range(80):
    i, bit = int(rng.choice(flippable)), int(rng.integers(0, 8))
    mutated = bytearray(valid_bytes)
    mutated[8 + i] ^= 1 << bit
    yield f"header byte {i} bit {bit} flipped", bytes(mutated)
  for declared in [0, 1, 2, length - 1, length + 1, len(valid_bytes), 2**31, 2**40, 2**63, 2**64 - 1,
                   *rng.integers(0, 2**62, 10).tolist()]:
    yield f"declared header length {declared}", int(declared).to_bytes(8, "little") + valid_bytes[8:]
  for dtype in ["I64", "I32", "F64", "U8", "BOOL", "F8_E4M3", "I8", "U16", "C64", "Q4", ""]:
    name = str(rng.choice(names))
    yield f"{name} as {dtype}", _rebuild(original, metadata, {name: dtype})
  for _ in range(30):
    name = str(rng.choice(names))
    poisoned = {**original, name: original[name].copy()}
    poisoned[name].reshape(-1)[int(rng.integers(0, poisoned[name].size))] = rng.choice([np.nan, np.inf, -np.inf])
    yield f"non-finite value in {name}", _rebuild(poisoned, metadata)
  for _ in range(10):
    name = str(rng.choice(names))
    yield f"{name} as float16 with a NaN", _rebuild({**original, name: np.full(original[name].shape, np.nan,
                                                                                   np.float16)}, metadata)
  extra_names = ["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "lm_head.weight",
                 "base_model.model.model.embed_tokens.base_layer.weight", "__evil__", "a" * 300]
  for extra in extra_names + [f"random.{rng.integers(1e9)}" for _ in range(5)]:
    yield f"extra tensor {extra[:40]}", _rebuild({**original, extra: np.ones((2, 16), np.float32)}, metadata)
  for name in names:
    yield f"missing {name}", _rebuild({k: v for k, v in original.items() if k != name}, metadata)
  for name in names:
    yield f"{name} transposed", _rebuild({**original, name: np.ascontiguousarray(original[name].T)}, metadata)
    yield f"{name} one row short", _rebuild({**original, name: original[name][:-1]}, metadata)
  for shape in ([2**40, 2**40], [2**62], [2**31, 2**31, 4], [-1, 16], [1.5, 2], ["2", 16], [True, 16], 16):
    broken = {**header, names[0]: {**header[names[0]], "shape": shape}}
    yield f"declared shape {shape}", _pack({"__metadata__": metadata, **broken}, valid_bytes[8 + length:])
  for offsets in ([0, 2**62], [2**40, 2**40 + 128], [-8, 120], [128, 0], [0], "0-128", [0, 128.0]):
    broken = {**header, names[0]: {**header[names[0]], "data_offsets": offsets}}
    yield f"declared offsets {offsets}", _pack({"__metadata__": metadata, **broken}, valid_bytes[8 + length:])
  for key, value in [("format", "np"), ("jlora_base_fingerprint", "sha256:" + "0" * 64), ("format", 3)]:
    yield f"metadata {key}={value!r}", _pack({"__metadata__": {**metadata, key: value}, **header},
                                             valid_bytes[8 + length:])
  yield "header is a list", _pack([1, 2], b"")  # type: ignore[arg-type]
  yield "header is deep nesting", len(b"[" * 100000).to_bytes(8, "little") + b"[" * 100000
  yield "header not utf-8", (4).to_bytes(8, "little") + b"\xff\xfe{}"
  yield "empty file", b""
  for protocol in range(6):
    yield f"pickle protocol {protocol}", pickle.dumps({"w": np.ones((4, 4), np.float32), "x": [1, 2]},
                                                      protocol=protocol)
  buffer = io.BytesIO()
  torch.save({name: torch.from_numpy(array.copy()) for name, array in original.items()}, buffer)
  yield "torch.save archive", buffer.getvalue()
  for _ in range(20):
    yield "random bytes", rng.bytes(int(rng.integers(1, 4096)))


def _config_mutations(valid_config: dict, rng: np.random.Generator):
  text = json.dumps(valid_config)
  for cut in rng.integers(0, len(text), 10):
    yield f"config truncated at {cut}", text[:int(cut)].encode()
  for key, value in [("r", 3), ("r", 0), ("r", "2"), ("r", True), ("lora_alpha", "nan"), ("peft_type", "IA3"),
                     ("target_modules", ["q_proj", "k_proj"]), ("target_modules", ["q_proj"]), ("target_modules", "("),
                     ("target_modules", ["input_layernorm"]), ("target_modules", ["nope"]), ("use_dora", True),
                     ("rank_pattern", {"q_proj": 3}), ("rank_pattern", {"q_proj": -1}), ("modules_to_save", ["lm_head"]),
                     ("init_lora_weights", "pissa"), ("bias", "all"), ("use_rslora", "yes"), ("lora_dropout", 2.0),
                     ("some_future_variant", {"on": True}), ("layers_to_transform", [0])]:
    yield f"config {key}={value!r}", json.dumps({**valid_config, key: value}).encode()
  yield "config duplicate key", text.replace('"r": 2', '"r": 2, "r": 2').encode()
  yield "config NaN literal", text.replace('"lora_alpha": 4', '"lora_alpha": NaN').encode()
  yield "config is a list", b"[]"
  yield "config pickle", pickle.dumps(valid_config)
  yield "config huge", b" " * (4 << 20) + text.encode()


def test_fuzzed_adapters_are_all_refused(valid, tmp_path):
  model, params, source = valid
  rng = np.random.default_rng(SEED)
  valid_bytes = (source / WEIGHTS).read_bytes()
  valid_config = json.loads((source / CONFIG).read_text())
  # (description, weights bytes, config bytes, keep the manifest); None means the valid file.
  cases = [(what, data, None, False) for what, data in _mutations(valid_bytes, rng)]
  cases += [(what, None, data, False) for what, data in _config_mutations(valid_config, rng)]
  for _ in range(40):  # with a manifest, a single flipped bit anywhere in either file
    target = str(rng.choice([WEIGHTS, CONFIG]))
    data = bytearray((source / target).read_bytes())
    i, bit = int(rng.integers(0, len(data))), int(rng.integers(0, 8))
    data[i] ^= 1 << bit
    what = f"with manifest: {target} byte {i} bit {bit}"
    cases.append((what, bytes(data), None, True) if target == WEIGHTS else (what, None, bytes(data), True))
  assert len(cases) > 300

  accepted, wrong_error = [], []
  for n, (what, weights, config, manifest) in enumerate(cases):
    directory = tmp_path / str(n)
    directory.mkdir()
    (directory / WEIGHTS).write_bytes(valid_bytes if weights is None else weights)
    (directory / CONFIG).write_bytes((source / CONFIG).read_bytes() if config is None else config)
    if manifest:
      shutil.copy(source / MANIFEST, directory / MANIFEST)
    try:
      jlora.peft.from_pretrained(directory, model, params)
      accepted.append(what)
    except jlora.UnsafeAdapterError as e:
      assert str(e), what
    except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
      wrong_error.append(f"{what}: {type(e).__name__}: {e}")
    shutil.rmtree(directory)
  assert not accepted, f"accepted {len(accepted)} mutated adapters: {accepted[:10]}"
  assert not wrong_error, f"{len(wrong_error)} raised something else: {wrong_error[:10]}"
