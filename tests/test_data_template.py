"""Chat rendering and training masks (train/data/_template.py) against token ids written out by hand."""

import numpy as np
import pytest
import tokenizers

from train.data import ChatTemplate, DataError, RoleFormat, default_template, pack_lm_examples, render_chat

SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<sep>"]
WORDS = ["be", "brief", "hi", "hello", "bye", "two", "plus", "is", "four"]
ID = {token: i for i, token in enumerate(SPECIAL + WORDS)}  # <pad>=0 <s>=1 </s>=2 ... <sep>=6 be=7 ... four=15


def _tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(dict(ID), unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIAL)
  return tok


def test_vocabulary_is_what_the_literals_below_assume():
  tokens = ["</s>", "<|system|>", "<|user|>", "<|assistant|>", "be", "hi", "bye"]
  assert [ID[t] for t in tokens] == [2, 3, 4, 5, 7, 9, 11]
  assert _tokenizer().encode("<|user|>\nhi</s>", add_special_tokens=False).ids == [4, 9, 2]


def test_default_template_multi_turn_chat():
  turns = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "bye")]
  example = render_chat(turns, default_template("</s>", bos_token="<s>"), _tokenizer())
  # <s> | <|system|> be brief </s> | <|user|> hi </s> | <|assistant|> hello </s> | <|user|> bye </s> |
  # <|assistant|> bye </s>   ("\n" headers/suffixes give no token with a whitespace pre-tokenizer)
  np.testing.assert_array_equal(example.ids, [1, 3, 7, 8, 2, 4, 9, 2, 5, 10, 2, 4, 11, 2, 5, 11, 2])
  np.testing.assert_array_equal(example.trained.astype(int), [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1])
  assert example.ids.dtype == np.int32

  rows = pack_lm_examples([example], seq_len=18)
  np.testing.assert_array_equal(rows["inputs"][0], [1, 3, 7, 8, 2, 4, 9, 2, 5, 10, 2, 4, 11, 2, 5, 11, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [3, 7, 8, 2, 4, 9, 2, 5, 10, 2, 4, 11, 2, 5, 11, 2, 0, 0])
  # 1 exactly where the target is assistant content or its end token.
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0])


def test_default_template_prompt_completion_and_text():
  tok = _tokenizer()
  example = render_chat([("prompt", "two plus two is"), ("completion", "four")], default_template("</s>"), tok)
  np.testing.assert_array_equal(example.ids, [12, 13, 12, 14, 15, 2])
  np.testing.assert_array_equal(example.trained.astype(int), [0, 0, 0, 0, 1, 1])
  example = render_chat([("text", "hi bye")], default_template("</s>"), tok)
  np.testing.assert_array_equal(example.ids, [9, 11, 2])
  np.testing.assert_array_equal(example.trained.astype(int), [1, 1, 1])


def test_custom_template_suffix_is_never_trained():
  template = ChatTemplate(
      roles={
          "user": RoleFormat(prefix="<|user|>", suffix="<sep>"),
          "assistant": RoleFormat(prefix="<|assistant|>", suffix="<sep>", trained=True, end=True),
      },
      end_token="</s>",
  )
  example = render_chat([("user", "hi"), ("assistant", "hello bye")], template, _tokenizer())
  # <|user|> hi <sep> | <|assistant|> hello bye </s> <sep>
  np.testing.assert_array_equal(example.ids, [4, 9, 6, 5, 10, 11, 2, 6])
  np.testing.assert_array_equal(example.trained.astype(int), [0, 0, 0, 0, 1, 1, 1, 0])


def test_unknown_role_and_missing_tokens_are_loud():
  tok = _tokenizer()
  with pytest.raises(DataError, match=r"role 'tool' has no format in the template") as e:
    render_chat([("tool", "hi")], default_template("</s>"), tok)
  assert e.value.reason == "bad_value"
  with pytest.raises(ValueError, match=r"end_token '<eos>' is not in the tokenizer's vocabulary"):
    render_chat([("text", "hi")], default_template("<eos>"), tok)
  with pytest.raises(ValueError, match=r"bos_token '<bos>' is not in the tokenizer's vocabulary"):
    render_chat([("text", "hi")], default_template("</s>", bos_token="<bos>"), tok)


def test_template_validation():
  with pytest.raises(ValueError, match=r"Roles \['assistant'\] end with the end token, but end_token is None"):
    ChatTemplate(roles={"assistant": RoleFormat(trained=True, end=True)})
  with pytest.raises(ValueError, match="No role of the template is trained"):
    ChatTemplate(roles={"user": RoleFormat()})
  template = default_template()
  with pytest.raises(TypeError):
    template.roles["user"] = RoleFormat()  # frozen: a template is a value
