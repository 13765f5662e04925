"""The benchmark harness runs end to end and writes the promised JSON (``python -m tools.bench --suite smoke``).

A smoke run on tiny shapes, in a subprocess: the benchmark then sees JAX's own defaults (not this
session's 8 fake devices and strict rank promotion), and it can compile at XLA backend optimisation
level 0: its twenty-odd compilations dominate the run, and the smoke checks the harness, not speed.
No timing is asserted: the benchmark is not a test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = (
    "lora_full_step_ratio",
    "lora_full_flop_ratio",
    "lora_full_memory_ratio",
    "unmerged_base_forward_ratio",
    "merged_base_forward_ratio",
    "jlora_nnx_step_ratio",
    "jlora_peft_step_ratio",
    "lora_full_compile_ratio_scan",
    "lora_full_compile_ratio_unrolled",
    "decode_tokens_per_s_base",
    "decode_tokens_per_s_lora",
    "dora_lora_step_ratio",
    "dora_lora_memory_ratio",
    "peft_dora_lora_step_ratio",
    "qlora_base_bytes_per_param",
    "qlora_step_base_bytes_per_param",
    "qlora_lora_memory_ratio",
    "qlora_lora_step_ratio",
    "qwix_base_bytes_per_param",
    "qwix_step_base_bytes_per_param",
    "jlora_qwix_qlora_step_ratio",
    "bank_mixed_one_prefill_ratio",
    "bank_mixed_one_decode_ratio",
    "bank_sgmv_bgmv_prefill_ratio",
    "bank_sgmv_bgmv_decode_ratio",
    "jlora_peft_mixed_prefill_ratio",
)


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("bench") / "results.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  done = subprocess.run([sys.executable, "-m", "tools.bench", "--suite", "smoke", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "| lora_full_step_ratio " in done.stdout  # the table is printed
  return json.loads(out.read_text())


def test_report_says_where_it_ran(smoke_report):
  assert smoke_report["suite"] == "smoke"
  assert smoke_report["device"].startswith("cpu")
  assert smoke_report["versions"]["jax"] and smoke_report["versions"]["flax"]
  load = smoke_report["machine"]["load_average_1min"]
  assert load["min"] <= load["mean"] <= load["max"]
  assert smoke_report["machine"]["usable_cores"] >= 1


def test_every_result_has_the_schema(smoke_report):
  results = smoke_report["results"]
  assert set(REQUIRED) <= set(results), sorted(set(REQUIRED) - set(results))
  for name, result in results.items():
    assert set(result) == {"value", "target", "detail"}, name
    assert isinstance(result["detail"], str) and result["detail"], name
    if result["value"] is not None:
      assert isinstance(result["value"], float) and math.isfinite(result["value"]), name
    assert result["target"] is None or isinstance(result["target"], float), name


def test_required_figures_are_measured(smoke_report):
  results = smoke_report["results"]
  # Only the decode rates may be null in a smoke run (noise can exceed a 4-token decode) and PEFT
  # when torch is absent; each null says why in its detail.
  may_be_null = {"decode_tokens_per_s_base", "decode_tokens_per_s_lora", "jlora_peft_step_ratio",
                 "peft_dora_lora_step_ratio", "jlora_peft_mixed_prefill_ratio"}
  for name in set(REQUIRED) - may_be_null:
    assert results[name]["value"] is not None and results[name]["value"] > 0, (name, results[name])
  for name in ("lora_full_memory_ratio", "merged_base_forward_ratio", "jlora_nnx_step_ratio", "jlora_peft_step_ratio",
               "bank_mixed_one_prefill_ratio", "bank_mixed_one_decode_ratio", "jlora_peft_mixed_prefill_ratio"):
    assert results[name]["target"] is not None, name
  # XLA's FLOP counts are deterministic: LoRA never does more work than full fine-tuning.
  assert 0 < results["lora_full_flop_ratio"]["value"] < 1
  # So are byte counts: the NF4 base with double quantization, on its arrays and as the compiled step's argument.
  for name in ("qlora_base_bytes_per_param", "qlora_step_base_bytes_per_param"):
    assert 0.5 < results[name]["value"] <= results[name]["target"] == 0.52, (name, results[name])
