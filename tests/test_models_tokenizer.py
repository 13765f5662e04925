"""load_tokenizer against transformers' fast tokenizers on the same tokenizer.json."""

import json

import pytest
import tokenizers
import transformers
from test_models_bert import SENTENCES, minilm_dir

from jlora import models


def test_minilm_token_ids_match_transformers():
  directory = minilm_dir()
  tokenizer = models.load_tokenizer(directory, padding_side="right")
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  expected = reference(SENTENCES, padding=True)
  encodings = tokenizer.encode_batch(SENTENCES)
  assert [e.ids for e in encodings] == expected["input_ids"]
  assert [e.attention_mask for e in encodings] == expected["attention_mask"]
  # Without padding_side, the file's fixed 128-token padding is switched off, as in transformers.
  unpadded = models.load_tokenizer(directory).encode(SENTENCES[4])
  assert unpadded.ids == reference(SENTENCES[4])["input_ids"]
  truncated = models.load_tokenizer(directory, max_length=5).encode(SENTENCES[0])
  assert truncated.ids == reference(SENTENCES[0], truncation=True, max_length=5)["input_ids"]


def _word_level_checkpoint(directory, pad_token="<pad>"):
  vocab = {"<pad>": 0, "<s>": 1, "hello": 2, "world": 3, "jax": 4, "<unk>": 5}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tokenizer.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))


def test_left_padding_for_generation(tmp_path):
  _word_level_checkpoint(tmp_path)
  tokenizer = models.load_tokenizer(tmp_path, padding_side="left")
  encodings = tokenizer.encode_batch(["hello world jax", "jax"])
  assert [e.ids for e in encodings] == [[1, 2, 3, 4], [0, 0, 1, 4]]
  assert [e.attention_mask for e in encodings] == [[1, 1, 1, 1], [0, 0, 1, 1]]
  reference = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>", padding_side="left"
  )
  assert reference(["hello world jax", "jax"], padding=True)["input_ids"] == [e.ids for e in encodings]


def test_padding_without_a_pad_token_is_an_error(tmp_path):
  _word_level_checkpoint(tmp_path, pad_token="<missing>")
  with pytest.raises(models.CheckpointError, match="pad token"):
    models.load_tokenizer(tmp_path, padding_side="left")
  assert models.load_tokenizer(tmp_path, padding_side="left", pad_token="<pad>").padding["pad_id"] == 0
  with pytest.raises(models.CheckpointError, match="No tokenizer.json"):
    models.load_tokenizer(tmp_path / "missing")
