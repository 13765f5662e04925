"""Adapter-only orbax checkpoints: round trip, metadata, and refusal of mismatches."""

import json

import chex
import jax
import numpy as np
import pytest
from _cases import ScannedStack

import jlora

X = np.ones((2, 4), np.float32)


@pytest.fixture(scope="module")
def setup():
  model = ScannedStack()
  params = model.init(jax.random.key(0), X)["params"]
  config = jlora.LoraConfig(targets=r".*/kernel", rank=2, alpha=4.0, rank_pattern={"head/.*": 1}, use_rslora=True)
  lora = jlora.Lora(model, config)
  adapters = jax.tree.map(lambda v: v + 0.5, lora.init(jax.random.key(1), params, X))
  return model, params, lora, adapters


def test_round_trip_with_metadata(setup, tmp_path):
  model, params, lora, adapters = setup
  fp = jlora.fingerprint(params)
  jlora.save_adapters(tmp_path / "a", adapters, lora.config, base_fingerprint=fp, extra={"step": 7})
  target = jax.eval_shape(lambda: adapters)
  restored, config = jlora.load_adapters(tmp_path / "a", target, base_fingerprint=fp)
  chex.assert_trees_all_equal(restored, adapters)
  assert config == lora.config
  assert jlora.load_adapter_metadata(tmp_path / "a")["extra"] == {"step": 7}
  # A fresh Lora built from the stored config reproduces the adapted model.
  fresh = jlora.Lora(model, config)
  chex.assert_trees_all_close(fresh.apply(params, restored, X), lora.apply(params, adapters, X))


def test_config_json_round_trip():
  config = jlora.LoraConfig(targets=["a", "b"], rank=3, alpha=1.5, dtype="bfloat16", alpha_pattern={"a": 2.0})
  assert jlora.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(jlora.JloraError, match="unknown keys"):
    jlora.LoraConfig.from_dict({**config.to_dict(), "lora_alpha": 3})


def test_fingerprint_detects_other_base(setup, tmp_path):
  _, params, lora, adapters = setup
  jlora.save_adapters(tmp_path / "a", adapters, lora.config, base_fingerprint=jlora.fingerprint(params))
  other = jax.tree.map(lambda v: v * 1.01, params)
  assert jlora.fingerprint(other) != jlora.fingerprint(params)
  with pytest.raises(jlora.JloraError, match="different base model"):
    jlora.load_adapters(tmp_path / "a", adapters, base_fingerprint=jlora.fingerprint(other))


def test_wrong_target_tree(setup, tmp_path):
  _, params, lora, adapters = setup
  jlora.save_adapters(tmp_path / "a", adapters, lora.config)
  wrong = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[:-1] + (v.shape[-1] + 1,), v.dtype), adapters)
  with pytest.raises(jlora.JloraError, match="does not match the expected tree"):
    jlora.load_adapters(tmp_path / "a", wrong)


def test_not_an_adapter_dir(tmp_path):
  with pytest.raises(jlora.JloraError, match="not a jlora adapter directory"):
    jlora.load_adapter_metadata(tmp_path)
  (tmp_path / "jlora_adapter.json").write_text("{nope")
  with pytest.raises(jlora.JloraError, match="not valid JSON"):
    jlora.load_adapter_metadata(tmp_path)
