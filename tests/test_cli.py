"""The jlora command line (jlora.cli; `jlora` / `python -m jlora`), end to end in subprocesses on saved adapters."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_gguf import byte_level_vocabulary, write_gguf
from test_models_references import save_hf, tiny_hf_model
from test_safe_load import random_like

import jlora
import jlora.peft
from jlora import cli, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENS = np.zeros((1, 1), np.int32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny Llama checkpoint and a jlora adapter for it (non-zero A and B, two ranks)."""
  root = tmp_path_factory.mktemp("cli")
  base = save_hf(tiny_hf_model("llama"), root / "base")
  model, params = models.from_pretrained(base)
  config = jlora.LoraConfig(targets=r".*/(q_proj|v_proj)/kernel", rank=4, alpha=8.0, rank_pattern={".*v_proj.*": 2})
  lora = jlora.Lora(model, config)
  adapters = random_like(jax.eval_shape(lora.init, jax.random.key(0), params, TOKENS), seed=1, scale=0.05)
  jlora.save_adapters(root / "adapter", adapters, config, base_fingerprint=jlora.fingerprint(params))
  return root, model, params, lora, adapters


def _start(*args: str, stdin=None) -> subprocess.Popen:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.Popen([sys.executable, "-m", "jlora", *map(str, args)], cwd=ROOT, env=env, text=True,
                          stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def test_commands_end_to_end(saved):
  root, model, params, lora, adapters = saved
  base, adapter = root / "base", root / "adapter"
  tampered = root / "tampered"
  shutil.copytree(adapter, tampered)
  data_file = next(p for p in sorted((tampered / "adapters").rglob("*")) if p.is_file() and "/d/" in p.as_posix())
  data_file.write_bytes(data_file.read_bytes()[:-1] + bytes([data_file.read_bytes()[-1] ^ 0x10]))

  # Independent commands run concurrently; import-peft then merge follow the export.
  running = {
      "inspect": _start("inspect", adapter, "--base", base),
      "validate": _start("validate", adapter, "--base", base),
      "export": _start("export-peft", "--base", base, "--adapter", adapter, "--out", root / "peft"),
      "tampered": _start("validate", tampered, "--base", base),
  }
  results = {name: _finish(process) for name, process in running.items()}

  code, out, err = results["inspect"]
  assert code == 0, err
  assert "model/layers/self_attn/v_proj/kernel  dense  2x64x32       2     4" in out
  assert "trainable params: 1,408" in out and "dtypes ['float32']" in out and "manifest: verified" in out
  assert "model/layers/self_attn/q_proj/kernel[1]" in out and "4 modules, median ratio" in out

  code, out, err = results["validate"]
  assert code == 0, err
  assert out.startswith(f"OK: {adapter} (jlora) fits {base}: 2 targets, 4 modules")

  code, out, err = results["tampered"]
  assert code == 1 and out == ""
  assert "error: " in err and "does not match its SHA-256 in SHA256SUMS" in err

  code, out, err = results["export"]
  assert code == 0, err
  assert "target_modules ['q_proj', 'v_proj']" in out
  exported, _ = jlora.peft.from_pretrained(root / "peft", model, params)
  jax.tree.map(np.testing.assert_array_equal, exported, adapters)
  assert jlora.verify_manifest(root / "peft", required=True)

  code, out, err = _finish(_start("import-peft", "--base", base, "--adapter", root / "peft", "--out", root / "back"))
  assert code == 0, err
  metadata = jlora.load_adapter_metadata(root / "back")
  assert metadata["base_fingerprint"] == jlora.fingerprint(params)
  assert metadata["extra"]["base_model_name_or_path"] == str(base)

  code, out, err = _finish(_start("merge", "--base", base, "--adapter", root / "back", "--out", root / "merged"))
  assert code == 0, err
  _, merged = models.from_pretrained(root / "merged")
  expected = jax.jit(lora.merge)(params, adapters)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), merged, expected)


def test_validate_refusals_in_process(saved, tmp_path, capsys):
  root, _, params, lora, adapters = saved
  blown = jax.tree.map(lambda x: 1e3 * x, adapters)
  jlora.save_adapters(tmp_path / "blown", blown, lora.config, base_fingerprint=jlora.fingerprint(params))
  assert cli.main(["validate", str(tmp_path / "blown"), "--base", str(root / "base")]) == 0
  captured = capsys.readouterr()
  assert "warning: Adapter" in captured.err and "suspicious update norms" in captured.err
  assert cli.main(["validate", str(tmp_path / "blown"), "--base", str(root / "base"), "--strict"]) == 1
  assert "Refused (LoadPolicy(strict=True))" in capsys.readouterr().err

  assert cli.main(["validate", str(root / "adapter"), "--base", str(root / "base"),
                   "--expected-fingerprint", "sha256:0"]) == 1
  assert "stores base fingerprint" in capsys.readouterr().err
  assert cli.main(["validate", str(tmp_path), "--base", str(root / "base")]) == 1
  assert "neither a jlora adapter directory" in capsys.readouterr().err


def test_adapters_without_a_fingerprint_need_the_flag(saved, tmp_path, capsys):
  root, model, params, lora, adapters = saved
  base = str(root / "base")
  jlora.save_adapters(tmp_path / "stripped", adapters, lora.config)  # no base_fingerprint stored
  assert cli.main(["validate", str(tmp_path / "stripped"), "--base", base]) == 1
  err = capsys.readouterr().err
  assert "stores no base fingerprint" in err and "--allow-missing-fingerprint" in err
  assert cli.main(["validate", str(tmp_path / "stripped"), "--base", base, "--allow-missing-fingerprint"]) == 0
  assert capsys.readouterr().out.startswith("OK: ")

  # A PEFT-format adapter without a fingerprint (as PEFT's own save_pretrained writes them): import needs the flag,
  # and the imported jlora adapter is fingerprinted to the base.
  jlora.peft.save_pretrained(tmp_path / "peft", adapters, lora.config, model)
  command = ["import-peft", "--base", base, "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "imported")]
  assert cli.main(command) == 1
  assert "PEFT's own save_pretrained writes none" in capsys.readouterr().err
  assert cli.main([*command, "--allow-missing-fingerprint"]) == 0
  assert jlora.load_adapter_metadata(tmp_path / "imported")["base_fingerprint"] == jlora.fingerprint(params)
  assert cli.main(["validate", str(tmp_path / "imported"), "--base", base]) == 0


def test_inspect_json(saved, capsys):
  root, *_ = saved
  assert cli.main(["inspect", str(root / "adapter"), "--json"]) == 0  # without a base: no values read
  out = json.loads(capsys.readouterr().out)
  assert out["kind"] == "jlora" and out["tensors"]["model/layers/self_attn/q_proj/kernel/lora_a"][0] == [2, 64, 4]
  assert cli.main(["inspect", str(root / "adapter"), "--base", str(root / "base"), "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["trainable"] == 1408 and out["dtypes"] == ["float32"] and len(out["norms"]["rows"]) == 4
  assert [row["rank"] for row in out["targets"]] == [4, 2]


def test_help_explains_every_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for command in ("inspect", "validate", "merge", "export-peft", "import-peft", "chat"):
    assert command in out
    with pytest.raises(SystemExit):
      cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "safety checks" in text and "--base" in text
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["merge", "--base", "x"])
  assert exit_info.value.code == 2


# --- jlora chat -----------------------------------------------------------------------------------------------

CHAT_TOKENS = 10


@pytest.fixture(scope="module")
def chat_bases(tmp_path_factory):
  """One tiny Qwen2 model as a GGUF file and as an HF directory (tokenizer.json and a chat template in
  tokenizer_config.json), a random adapter saved in PEFT's format for the first and jlora's for the second."""
  root = tmp_path_factory.mktemp("chat")
  vocabulary = byte_level_vocabulary()
  hf_model = tiny_hf_model("qwen2", vocab_size=len(vocabulary["tokens"]), matrix_noise=0.3, tie_word_embeddings=True)
  gguf_file = root / "tiny.gguf"
  write_gguf(gguf_file, "qwen2", hf_model, {}, vocabulary)
  hf_dir = pathlib.Path(save_hf(hf_model, root / "hf"))
  models.load_tokenizer(gguf_file).save(str(hf_dir / "tokenizer.json"))
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": vocabulary["template"],
                                                            "eos_token": "<|im_end|>"}))
  config = jlora.LoraConfig(targets=r".*/(q_proj|v_proj|down_proj)/kernel", rank=4, alpha=8.0)
  bases = {}
  for name, base in (("gguf", gguf_file), ("hf", hf_dir)):
    model, params = models.from_pretrained(base)
    lora = jlora.Lora(model, config)
    adapters = random_like(jax.eval_shape(lora.init, jax.random.key(0), params, TOKENS), seed=5, scale=0.3)
    if name == "gguf":
      adapter = root / "peft"
      jlora.peft.save_pretrained(adapter, adapters, config, model, params=params, base_model_name_or_path=str(base))
    else:
      adapter = root / "jlora"
      jlora.save_adapters(adapter, adapters, config, base_fingerprint=jlora.fingerprint(params))
    bases[name] = dict(base=base, adapter=adapter, model=model, params=params, lora=lora, adapters=adapters)
  return bases


def _greedy_answers(case: dict, prompts: list[str]) -> list[str]:
  """The reference: each turn's answer by jlora.models.generate (one jitted while_loop), the conversation growing."""
  tokenizer, template = models.load_tokenizer(case["base"]), models.load_chat_template(case["base"])
  end = tokenizer.token_to_id("<|im_end|>")
  params, lora = case["lora"].inject(case["params"], case["adapters"]), case["lora"]
  messages, answers = [], []
  for prompt in prompts:
    messages.append({"role": "user", "content": prompt})
    ids = tokenizer.encode(models.apply_chat_template(template, messages), add_special_tokens=False).ids
    out = models.generate(case["model"], params, jnp.asarray([ids]), max_new_tokens=CHAT_TOKENS, eos_token_id=end,
                          apply_fn=lora.apply_fn())
    new = np.asarray(out)[0, len(ids):].tolist()
    answer = tokenizer.decode(new[:new.index(end)] if end in new else new, skip_special_tokens=True)
    messages.append({"role": "assistant", "content": answer})
    answers.append(answer)
  return answers


def test_chat_subprocess_gguf_base_peft_adapter_multi_turn(chat_bases):
  case = chat_bases["gguf"]
  prompts = ["the quick brown fox", "def main(): return 42"]
  process = _start("chat", "--base", case["base"], "--adapter", case["adapter"], "--max-new-tokens", CHAT_TOKENS,
                   stdin=subprocess.PIPE)
  out, err = process.communicate("\n".join(prompts) + "\n", timeout=300)
  assert process.returncode == 0, err
  expected = _greedy_answers(case, prompts)
  assert all(answer.strip() for answer in expected)  # the check below compares real text
  assert out == "".join(answer + "\n" for answer in expected)


class _Writes(io.StringIO):
  """stdout that remembers each write."""

  def __init__(self):
    super().__init__()
    self.pieces = []

  def write(self, text):
    self.pieces.append(text)
    return super().write(text)


def test_chat_streams_token_by_token_hf_directory_jlora_adapter(chat_bases, monkeypatch):
  case = chat_bases["hf"]
  stdout = _Writes()
  monkeypatch.setattr(sys, "stdout", stdout)
  assert cli.main(["chat", "--base", str(case["base"]), "--adapter", str(case["adapter"]), "--prompt",
                   "naïve café", "--max-new-tokens", str(CHAT_TOKENS)]) == 0
  (expected,) = _greedy_answers(case, ["naïve café"])
  assert stdout.getvalue() == expected + "\n"
  pieces = [piece for piece in stdout.pieces if piece]
  assert len(pieces) >= 4 and "".join(pieces) == expected + "\n"  # printed as decoded, not all at the end


def test_chat_refuses_a_base_without_tokenizer_or_template(saved, chat_bases, tmp_path, capsys):
  root, *_ = saved
  assert cli.main(["chat", "--base", str(root / "base"), "--prompt", "hi"]) == 1  # an HF dir without tokenizer.json
  assert "No tokenizer.json" in capsys.readouterr().err
  bare = tmp_path / "bare"
  shutil.copytree(chat_bases["hf"]["base"], bare)
  (bare / "tokenizer_config.json").unlink()
  assert cli.main(["chat", "--base", str(bare), "--prompt", "hi"]) == 1
  assert "has no chat template" in capsys.readouterr().err


def test_vera_adapters_and_pissa_refusal(saved, tmp_path, capsys):
  """VeRA needs its projections: a jlora checkpoint rebuilds them from the config's seed, a PEFT file brings its
  own; both validate and merge to the adapted logits. A PiSSA checkpoint (trained on a residual base that is not
  on disk) is refused with what to do instead."""
  root, model, params, *_ = saved
  base = str(root / "base")
  config = jlora.LoraConfig(targets=r".*/(q_proj|v_proj)/kernel", rank=8, variant="vera", projection_seed=3)
  vera = jlora.Lora(model, config)
  vera_params, initial = vera.init_with_base(jax.random.key(0), params, TOKENS)
  adapters = random_like(initial, seed=2, scale=0.3)
  jlora.save_adapters(tmp_path / "vera", adapters, config, base_fingerprint=jlora.fingerprint(vera_params))
  jlora.peft.save_pretrained(tmp_path / "vera_peft", adapters, config, model, params=vera_params)
  ids = jnp.array([[3, 1, 4, 1, 5, 9]])
  expected = vera.apply(vera_params, adapters, ids)
  assert not np.allclose(expected, model.apply({"params": params}, ids), atol=1e-3)  # the adapter changes logits
  for adapter in ("vera", "vera_peft"):
    assert cli.main(["validate", str(tmp_path / adapter), "--base", base, "--allow-missing-fingerprint"]) == 0, (
        capsys.readouterr().err)
    assert capsys.readouterr().out.startswith("OK: ")
    assert cli.main(["merge", "--base", base, "--adapter", str(tmp_path / adapter), "--out",
                     str(tmp_path / f"{adapter}_merged"), "--dtype", "float32", "--allow-missing-fingerprint"]) == 0
    merged_model, merged = models.from_pretrained(tmp_path / f"{adapter}_merged")
    np.testing.assert_allclose(merged_model.apply({"params": merged}, ids), expected, atol=2e-5, rtol=0)
    assert capsys.readouterr().out.startswith("merged ")

  pissa = jlora.Lora(model, jlora.LoraConfig(targets=r".*/q_proj/kernel", rank=2, init="pissa"))
  residual, pissa_adapters = pissa.init_with_base(jax.random.key(0), params, TOKENS)
  jlora.save_adapters(tmp_path / "pissa", pissa_adapters, pissa.config, base_fingerprint=jlora.fingerprint(residual))
  assert cli.main(["validate", str(tmp_path / "pissa"), "--base", base]) == 1
  assert "to_plain_lora" in capsys.readouterr().err
