"""Records to tokenized examples (train/data/_encode.py): layouts, bad records, and where tokenization finds them."""

import numpy as np
import tokenizers

from train.data import ChatTemplate, RoleFormat
from train.data._encode import ClassificationEncoder, LMEncoder, record_turns
from train.data._errors import BadExample
from train.data._packing import ClassificationExample

WORDS = ["<pad>", "</s>", "[CLS]", "[SEP]", "a", "b", "c"]  # ids 0..6


def _tokenizer(post_processor=False):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(WORDS[:4])
  if post_processor:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


def _as_lists(result):
  if isinstance(result, BadExample):
    return result
  return result.ids.tolist(), result.trained.astype(int).tolist()


def test_record_layouts():
  assert record_turns({"role": np.array([b"user", b"assistant"], object), "content": [b"x", "y"]}) == [
      ("user", "x"), ("assistant", "y")]
  assert record_turns({"prompt": b"p", "completion": b"c", "file": b"f", "line": 3}) == [
      ("prompt", "p"), ("completion", "c")]
  assert record_turns({"text": "t"}) == [("text", "t")]
  assert record_turns({"question": b"q"}) == BadExample(
      "missing_field",
      "the record has fields ['question']; expected 'role'+'content', 'prompt'+'completion' or 'text' "
      "(or pass turns_fn)")
  assert record_turns({"text": 3}) == BadExample("wrong_type", "roles and contents must be strings or bytes")
  assert record_turns({"role": [b"user"], "content": []}) == BadExample("bad_value", "1 roles but 0 contents")


def test_lm_encoder_finds_over_long_and_untrainable_examples():
  template = ChatTemplate(roles={"prompt": RoleFormat(), "completion": RoleFormat(trained=True)})
  encoder = LMEncoder(_tokenizer(), template, seq_len=3)
  results = encoder([
      {"prompt": b"a b", "completion": b"c c"},      # 4 tokens, 3 positions: fits exactly
      {"prompt": b"a b", "completion": b"c c c"},    # 5 tokens, 4 positions: over-long
      {"prompt": b"a b", "completion": b""},         # nothing trained
      {"role": [b"tool"], "content": [b"a"]},        # role not in the template
      {"text": b"a"},                                # role "text" not in this template either
  ])
  assert [_as_lists(r) for r in results] == [
      ([4, 5, 6, 6], [0, 0, 1, 1]),
      BadExample("over_long", "5 tokens need 4 positions, more than seq_len=3"),
      BadExample("no_target_tokens", "no token to train on after tokenization (empty completion?)"),
      BadExample("bad_value", "role 'tool' has no format in the template (it has ['completion', 'prompt'])"),
      BadExample("bad_value", "role 'text' has no format in the template (it has ['completion', 'prompt'])"),
  ]


def test_lm_encoder_turns_fn_for_other_layouts():
  template = ChatTemplate(roles={"user": RoleFormat(), "assistant": RoleFormat(trained=True, end=True)},
                          end_token="</s>")
  encoder = LMEncoder(_tokenizer(), template, seq_len=8,
                      turns_fn=lambda r: [("user", r["q"].decode()), ("assistant", r["a"].decode())])
  (example,) = encoder([{"q": b"a", "a": b"b c"}])
  assert _as_lists(example) == ([4, 5, 6, 1], [0, 1, 1, 1])


def test_classification_encoder():
  encoder = ClassificationEncoder(_tokenizer(post_processor=True), seq_len=4, num_classes=3)
  results = encoder([
      {"text": b"a b", "label": np.int64(2)},
      {"text": b"a b c", "label": 0},       # [CLS] a b c [SEP] = 5 tokens
      {"text": b"a", "label": 3},
      {"text": b"a", "label": "pos"},
      {"text": b"a", "label": True},
      {"label": 1},
  ])
  first = results[0]
  assert isinstance(first, ClassificationExample)
  assert (first.ids.tolist(), first.type_ids.tolist(), first.label) == ([2, 4, 5, 3], [0, 0, 0, 0], 2)
  assert results[1:] == [
      BadExample("over_long", "5 tokens, more than seq_len=4"),
      BadExample("bad_value", "label 3 is outside [0, 3)"),
      BadExample("wrong_type", "'label' is str, expected an integer class index"),
      BadExample("wrong_type", "'label' is bool, expected an integer class index"),
      BadExample("missing_field", "no 'text' field; the record has ['label']"),
  ]
