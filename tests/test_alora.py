"""Activated LoRA (``LoraConfig(invocation_tokens=...)``) against PEFT's aLoRA, and the conversation switch: a chat
run on the base model continues with an aLoRA adapter from the base's KV cache, without recomputing its prefix."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _multi_adapter import ALLOW_NO_FINGERPRINT, INVOCATION, base, batch, peft_adapters, peft_logits
from test_models_references import tiny_hf_model

import jlora
import jlora.peft
from jlora import models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _starts_by_hand(ids, tokens):
  out = []
  for row in ids.tolist():
    found = [i for i in range(len(row) - len(tokens) + 1) if row[i:i + len(tokens)] == list(tokens)]
    out.append(found[-1] if found else -1)
  return out


def test_invocation_starts_is_the_last_occurrence():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 4, size=(64, 12))  # a small vocabulary: many (overlapping) occurrences
  for tokens in ([1], [2, 2], [1, 3, 1], [3, 3, 3, 3]):
    assert jlora.invocation_starts(ids, tokens).tolist() == _starts_by_hand(ids, tokens)
  assert jax.jit(jlora.invocation_starts, static_argnums=1)(ids, (2, 2)).tolist() == _starts_by_hand(ids, [2, 2])


@pytest.fixture(scope="module")
def alora():
  """The PEFT aLoRA adapter ``c`` loaded by jlora.peft, as a traced jlora.Lora with its adapters."""
  _, model, params = base()
  _, paths = peft_adapters()
  adapters, config = jlora.peft.from_pretrained(paths["c"], model, params, batch()[0][:1], policy=ALLOW_NO_FINGERPRINT)
  lora = jlora.Lora(model, config)
  lora.trace(params, batch()[0][:1])
  return model, params, lora, adapters


def test_import_and_export_equal_peft_logits(alora, tmp_path):
  model, params, lora, adapters = alora
  peft_model, _ = peft_adapters()
  assert lora.config.invocation_tokens == tuple(INVOCATION) and lora.variant is jlora.ALORA
  ids, mask = batch()
  peft_model.set_adapter("c")
  expected = peft_logits(peft_model, ids, mask)
  got = np.asarray(jax.jit(lambda p, a: lora.apply(p, a, ids, mask))(params, adapters))
  keep = mask.astype(bool)
  np.testing.assert_allclose(got[keep], expected[keep], rtol=0, atol=1e-5)
  plain = np.asarray(model.apply({"params": params}, ids, mask))
  changed = np.abs(got - plain).max(-1) > 1e-3
  # Rows 0-2 have no invocation: the base model exactly; rows 3 and 4 from their last invocation on.
  assert changed.tolist()[3] == [False] * 4 + [True] * 5 and changed.tolist()[4] == [False] * 6 + [True] * 3
  assert not changed[:3].any()

  written = jlora.peft.save_pretrained(tmp_path / "export", adapters, lora.config, model, params=params)
  assert written["alora_invocation_tokens"] == INVOCATION
  import peft

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    reloaded = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), tmp_path / "export").eval()
  np.testing.assert_allclose(peft_logits(reloaded, ids, mask)[keep], got[keep], rtol=0, atol=1e-5)

  # jlora's own checkpoint keeps the invocation in its config.
  jlora.save_adapters(tmp_path / "jlora", adapters, lora.config, base_fingerprint=jlora.fingerprint(params))
  saved = json.loads((tmp_path / "jlora" / "jlora_adapter.json").read_text())["lora_config"]
  assert saved["invocation_tokens"] == INVOCATION
  again, config = jlora.load_adapters(tmp_path / "jlora", adapters, params=params, lora=lora)
  assert config == lora.config
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(adapters), strict=True))


def test_no_gradient_before_the_invocation(alora):
  model, params, lora, adapters = alora
  ids, mask = batch()
  # Cotangents on the logits before each row's invocation (row 0 has none at all), then after row 3's.
  selections = [(3, slice(0, 4)), (4, slice(0, 6)), (0, slice(None)), (3, slice(4, None))]
  cotangents = [np.zeros((*ids.shape, 128), np.float32) for _ in selections]
  for cotangent, (row, tokens) in zip(cotangents, selections):
    cotangent[row, tokens] = 1.0

  @jax.jit
  def grads(adapters):
    _, vjp = jax.vjp(lambda a: lora.apply(params, a, ids, mask), adapters)
    return [vjp(jnp.asarray(c))[0] for c in cotangents]

  *before, after = grads(adapters)
  for g in before:
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(g))
  assert all(np.any(leaf) for leaf in jax.tree.leaves(after))


def test_a_conversation_on_the_base_continues_with_the_alora_adapter(alora):
  """The base answers a first turn; the second turn carries the invocation and continues from the base's cache:
  the prefix is not recomputed (only the new tokens are prefilled, its cache entries stay the base's bit for bit)
  and the tokens equal PEFT's generate over the whole conversation, which recomputes everything."""
  model, params, lora, adapters = alora
  rng = np.random.default_rng(5)
  first = rng.integers(1, 17, size=(2, 6)).astype(np.int32)
  first_mask = np.ones_like(first)
  first[0, :2], first_mask[0, :2] = 0, 0
  tokens, cache = models.generate(model, params, first, first_mask, max_new_tokens=3, cache_length=24,
                                  return_cache=True)
  turn = rng.integers(1, 17, size=(2, 5)).astype(np.int32)
  turn[0, 1:3] = INVOCATION
  turn[1, 3:5] = INVOCATION
  calls = []

  def recording(variables, ids, **kwargs):  # runs while generate is traced: records each model call's tokens
    calls.append(ids.shape[1])
    return lora.apply_fn()(variables, ids, **kwargs)

  switched, switched_cache = models.generate(model, lora.inject(params, adapters), turn, max_new_tokens=4,
                                             cache=cache, apply_fn=recording, return_cache=True)
  used = first.shape[1] + 3
  assert calls[0] == turn.shape[1] and set(calls[1:]) == {1}  # prefill of the new turn only, then one token a step
  assert int(switched_cache["model"]["cache_index"]) == used + turn.shape[1] + 4
  for name in ("cached_key", "cached_value"):
    old = cache["model"]["layers"]["self_attn"][name][:, :, :used]
    new = switched_cache["model"]["layers"]["self_attn"][name][:, :, :used]
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))

  # The same conversation in one pass, recomputed from scratch by PEFT's generate with the adapter (and without).
  whole = np.concatenate([np.asarray(tokens), turn], axis=1)
  whole_mask = np.concatenate([first_mask, np.ones((2, 3), np.int32), np.ones_like(turn)], axis=1)
  peft_model, _ = peft_adapters()
  peft_model.set_adapter("c")
  inputs = dict(input_ids=torch.from_numpy(whole.astype(np.int64)), max_new_tokens=4, do_sample=False,
                attention_mask=torch.from_numpy(whole_mask.astype(np.int64)), pad_token_id=0)
  with torch.no_grad():
    peft_tokens = peft_model.generate(**inputs).numpy()[:, -4:]
    with peft_model.disable_adapter():
      base_tokens = peft_model.generate(**inputs).numpy()[:, -4:]
  np.testing.assert_array_equal(np.asarray(switched)[:, -4:], peft_tokens)
  assert not np.array_equal(base_tokens, peft_tokens)


def test_what_alora_refuses(alora, tmp_path):
  model, params, lora, adapters = alora
  ids = batch()[0][:1]
  for kwargs, message in ((dict(use_dora=True), "DoRA"), (dict(init="pissa"), "PiSSA"),
                          (dict(variant="vera"), "LoRA family")):
    with pytest.raises(jlora.JloraError, match=message):
      jlora.LoraConfig(targets=r".*/q_proj/kernel", invocation_tokens=[1], **kwargs)
  for bad in ([], [1, -2], "ab", [1.5]):
    with pytest.raises(jlora.JloraError, match="invocation_tokens"):
      jlora.LoraConfig(targets=r".*/q_proj/kernel", invocation_tokens=bad)
  embed = jlora.Lora(model, jlora.LoraConfig(targets=r"model/embed_tokens/embedding", invocation_tokens=[1]))
  with pytest.raises(jlora.JloraError, match="Linear layers only"):
    embed.init(jax.random.key(0), params, ids)
  with pytest.raises(jlora.JloraError, match="no merged kernel"):
    lora.merge(params, adapters)
  with pytest.raises(jlora.JloraError, match="token ids"):
    lora.apply(params, adapters, jnp.ones((1, 3), jnp.float32))
  # A PEFT file that puts aLoRA on an embedding (which PEFT itself refuses to build) is refused.
  _, paths = peft_adapters()
  shutil.copytree(paths["c"], tmp_path / "embed")
  config_file = tmp_path / "embed" / "adapter_config.json"
  raw = json.loads(config_file.read_text())
  config_file.write_text(json.dumps({**raw, "target_modules": [*raw["target_modules"], "embed_tokens"]}))
  with pytest.raises(jlora.UnsafeAdapterError, match="aLoRA adapts Linear"):
    jlora.peft.from_pretrained(tmp_path / "embed", model, params, ids, policy=ALLOW_NO_FINGERPRINT)
