"""LoraConfig: validation, per-path rank/alpha overrides, rsLoRA scaling."""

import dataclasses
import math

import numpy as np
import pytest

import jlora


def test_frozen_and_keyword_only():
  config = jlora.LoraConfig(targets="kernel")
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.rank = 4  # type: ignore[misc]
  with pytest.raises(TypeError):
    jlora.LoraConfig("kernel")  # type: ignore[misc]


def test_defaults():
  config = jlora.LoraConfig(targets="kernel")
  assert (config.rank, config.alpha, config.dropout, config.use_rslora, config.init) == (8, 16.0, 0.0, False, "kaiming_uniform")
  assert np.dtype(config.dtype) == np.float32


def test_patterns_first_match_wins_and_scale():
  config = jlora.LoraConfig(
      targets=[r".*/q_proj/kernel", r".*/v_proj/kernel"],
      rank=8,
      alpha=16.0,
      rank_pattern={r"layers_0/.*": 4, r".*q_proj.*": 2},
      alpha_pattern={r".*/v_proj/kernel": 32.0},
  )
  assert config.target_rules == (r".*/q_proj/kernel", r".*/v_proj/kernel")
  assert config.rank_for("layers_0/attn/q_proj/kernel") == 4  # first rule wins over the second
  assert config.rank_for("layers_1/attn/q_proj/kernel") == 2
  assert config.rank_for("layers_1/attn/v_proj/kernel") == 8
  assert config.alpha_for("layers_1/attn/v_proj/kernel") == 32.0
  assert config.scale_for("layers_1/attn/v_proj/kernel", 8) == 4.0
  assert config.scale_for("layers_1/attn/q_proj/kernel", 2) == 8.0
  assert not config.matches("layers_1/attn/k_proj/kernel")


def test_rslora_scale():
  config = jlora.LoraConfig(targets="k", rank=16, alpha=8.0, use_rslora=True)
  assert math.isclose(config.scale_for("k", 16), 8.0 / 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=[]), "empty"),
        (dict(targets="("), "not a valid regex"),
        (dict(targets="k", rank=0), "positive int"),
        (dict(targets="k", rank=2.0), "positive int"),
        (dict(targets="k", rank_pattern={"x": -1}), r"rank_pattern\['x'\]"),
        (dict(targets="k", alpha_pattern={"[": 1.0}), "not a valid regex"),
        (dict(targets="k", dropout=1.0), "dropout"),
        (dict(targets="k", dropout="0.1"), "dropout"),
        (dict(targets="k", alpha="16"), "alpha must be a finite number"),
        (dict(targets="k", alpha=float("nan")), "alpha must be a finite number"),
        (dict(targets="k", alpha=True), "alpha must be a finite number"),
        (dict(targets="k", alpha_pattern={"k": None}), r"alpha_pattern\['k'\]"),
        (dict(targets="k", use_rslora=1), "use_rslora must be True or False"),
        (dict(targets="k", init="orthogonal"), "init"),
        (dict(targets="k", dtype="int8"), "floating"),
    ],
)
def test_invalid(kwargs, match):
  with pytest.raises(jlora.JloraError, match=match):
    jlora.LoraConfig(**kwargs)


def test_the_config_carries_the_variant():
  """use_dora / init select the variant and its start; the config alone rebuilds it (to_dict/from_dict, JSON)."""
  import json

  for kwargs, variant, rewrites in [(dict(), jlora.LORA, False), (dict(use_dora=True), jlora.DORA, False),
                                    (dict(init="pissa"), jlora.LORA, True), (dict(init="pissa_niter_16"), jlora.LORA, True),
                                    (dict(init="olora", use_dora=True), jlora.DORA, True)]:
    config = jlora.LoraConfig(targets=["a", "b"], rank=4, rank_pattern={"a": 2}, **kwargs)
    assert jlora.variant_for(config) is variant and config.rewrites_base == rewrites
    again = jlora.LoraConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and jlora.variant_for(again) is variant
  assert (jlora.LoraConfig(targets="k").use_dora, jlora.LoraConfig(targets="k").variant) == (False, "lora")


@pytest.mark.parametrize("kwargs, match", [
    (dict(init="pissa_niter_"), "LoraConfig.init must be"),
    (dict(init="pissa_niter_-1"), "LoraConfig.init must be"),
    (dict(init="pissa_niter_07"), "LoraConfig.init must be"),
    (dict(init="svd"), "LoraConfig.init must be"),
    (dict(init=None), "LoraConfig.init must be"),
    (dict(use_dora=1), "use_dora must be True or False"),
    (dict(variant="nope"), "'nope' is not an available adapter variant"),
])
def test_invalid_variant_options(kwargs, match):
  with pytest.raises(jlora.JloraError, match=match):
    jlora.LoraConfig(targets="k", **kwargs)
