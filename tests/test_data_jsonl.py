"""Checking JSONL lines (train/data/_jsonl.py): every kind of bad line gets its reason and a useful detail."""

import pytest

from train.data._errors import BadExample
from train.data._jsonl import classification_pair, instruction_turns


def test_good_instruction_lines():
  assert instruction_turns('{"prompt": "", "completion": " 4", "extra": 1}') == [("prompt", ""), ("completion", " 4")]
  chat = ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, '
          '{"role": "assistant", "content": "a"}]}')
  assert instruction_turns(chat) == [("system", "s"), ("user", "u"), ("assistant", "a")]
  assert instruction_turns('{"q": "2+2=", "a": "4"}', prompt_field="q", completion_field="a") == [
      ("prompt", "2+2="), ("completion", "4")]
  assert instruction_turns('{"conv": [{"role": "assistant", "content": "x"}]}', messages_field="conv") == [
      ("assistant", "x")]


@pytest.mark.parametrize("line, reason, detail", [
    ('{"prompt": "a", "completion": "b"', "malformed_json", "not valid JSON (Expecting ',' delimiter at column 34)"),
    ('["prompt", "completion"]', "wrong_type", "the line is a JSON array, expected an object"),
    ('{"prompt": "a"}', "missing_field", "no 'completion' field (the completion); the line has ['prompt']"),
    ('{"completion": "b"}', "missing_field", "no 'prompt' field (the prompt); the line has ['completion']"),
    ('{"text": "b"}', "missing_field", "needs 'prompt' and 'completion', or 'messages'; the line has ['text']"),
    ('{"prompt": 1, "completion": "b"}', "wrong_type", "'prompt' is a JSON int, expected a string"),
    ('{"prompt": "a", "completion": null}', "wrong_type", "'completion' is a JSON null, expected a string"),
    ('{"prompt": "a", "completion": "  "}', "bad_value", "'completion' is blank: nothing to train on"),
    ('{"messages": "hi"}', "wrong_type", "'messages' is a JSON string, expected an array"),
    ('{"messages": [1]}', "wrong_type", "messages[0] is a JSON int, expected an object"),
    ('{"messages": [{"role": "user"}]}', "missing_field",
     "messages[0]: no 'content' field (messages[0]); the line has ['role']"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', "wrong_type",
     "messages[0]: 'content' is a JSON array, expected a string"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "bad_value",
     "messages[0] has role 'tool', expected one of ('system', 'user', 'assistant')"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', "bad_value",
     "'messages' has no non-blank assistant message to train on"),
])
def test_bad_instruction_lines(line, reason, detail):
  assert instruction_turns(line) == BadExample(reason, detail)


@pytest.mark.parametrize("line, expected", [
    ('{"text": "t", "label": 0}', ("t", 0)),
    ('{"text": "t", "label": "pos"}', ("t", "pos")),
    ('{"text": "t"', BadExample("malformed_json", "not valid JSON (Expecting ',' delimiter at column 13)")),
    ('"t"', BadExample("wrong_type", "the line is a JSON string, expected an object")),
    ('{"label": 1}', BadExample("missing_field", "no 'text' field (the text); the line has ['label']")),
    ('{"text": "t"}', BadExample("missing_field", "no 'label' field (the label); the line has ['text']")),
    ('{"text": 3, "label": 1}', BadExample("wrong_type", "'text' is a JSON int, expected a string")),
    ('{"text": " ", "label": 1}', BadExample("bad_value", "'text' is blank")),
    ('{"text": "t", "label": true}',
     BadExample("wrong_type", "'label' is a JSON boolean, expected an integer or a string")),
    ('{"text": "t", "label": [1]}',
     BadExample("wrong_type", "'label' is a JSON array, expected an integer or a string")),
    ('{"text": "t", "label": -1}', BadExample("bad_value", "'label' is -1, expected an integer >= 0")),
    ('{"text": "t", "label": ""}', BadExample("bad_value", "'label' is an empty string")),
])
def test_classification_lines(line, expected):
  assert classification_pair(line) == expected


def test_classification_field_names():
  assert classification_pair('{"sentence": "s", "y": 2}', text_field="sentence", label_field="y") == ("s", 2)
