"""JSONL lines checked into examples: instruction turns, or (text, label) pairs. Bad lines become ``BadExample``."""

import json
from typing import Any

from train.data._errors import BAD_VALUE, MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, BadExample

CHAT_ROLES = ("system", "user", "assistant")


def _type(value: Any) -> str:
  return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
      type(value), type(value).__name__
  )


def parse_object(line: str) -> dict[str, Any] | BadExample:
  """Parses one JSONL line that must hold a JSON object."""
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    return BadExample(MALFORMED_JSON, f"not valid JSON ({e.msg} at column {e.colno})")
  if not isinstance(value, dict):
    return BadExample(WRONG_TYPE, f"the line is a JSON {_type(value)}, expected an object")
  return value


def _string(obj: dict[str, Any], field: str, what: str) -> str | BadExample:
  if field not in obj:
    return BadExample(MISSING_FIELD, f"no {field!r} field ({what}); the line has {sorted(obj)}")
  if not isinstance(obj[field], str):
    return BadExample(WRONG_TYPE, f"{field!r} is a JSON {_type(obj[field])}, expected a string")
  return obj[field]


def instruction_turns(
    line: str, *, prompt_field: str = "prompt", completion_field: str = "completion", messages_field: str = "messages"
) -> list[tuple[str, str]] | BadExample:
  """Checks one instruction line and returns its turns as ``(role, content)`` pairs.

  A line is either ``{prompt_field: str, completion_field: str}``, giving turns ``[("prompt", p),
  ("completion", c)]``, or chat-style ``{messages_field: [{"role": r, "content": str}, ...]}`` with
  ``r`` in ``("system", "user", "assistant")``, giving the messages in order. The completion, or at least
  one assistant message, must be non-blank: it is what the model is trained on.

  Args:
    line: one line of the file, without its line break.
    prompt_field: the prompt's field name.
    completion_field: the completion's field name.
    messages_field: the field name of a chat-style line's message list.

  Returns:
    The turns, or a ``BadExample`` saying what is wrong.

  Example:
    >>> instruction_turns('{"prompt": "2+2=", "completion": "4"}')
    [('prompt', '2+2='), ('completion', '4')]
    >>> instruction_turns('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}')
    [('user', 'hi'), ('assistant', 'yo')]
    >>> instruction_turns('{"prompt": "2+2="}')
    BadExample(reason='missing_field', detail="no 'completion' field (the completion); the line has ['prompt']")
  """
  obj = parse_object(line)
  if isinstance(obj, BadExample):
    return obj
  if messages_field in obj:
    messages = obj[messages_field]
    if not isinstance(messages, list):
      return BadExample(WRONG_TYPE, f"{messages_field!r} is a JSON {_type(messages)}, expected an array")
    turns = []
    for i, message in enumerate(messages):
      if not isinstance(message, dict):
        return BadExample(WRONG_TYPE, f"{messages_field}[{i}] is a JSON {_type(message)}, expected an object")
      role = _string(message, "role", f"{messages_field}[{i}]")
      content = _string(message, "content", f"{messages_field}[{i}]")
      for value in (role, content):
        if isinstance(value, BadExample):
          return BadExample(value.reason, f"{messages_field}[{i}]: {value.detail}")
      if role not in CHAT_ROLES:
        return BadExample(BAD_VALUE, f"{messages_field}[{i}] has role {role!r}, expected one of {CHAT_ROLES}")
      turns.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in turns):
      return BadExample(BAD_VALUE, f"{messages_field!r} has no non-blank assistant message to train on")
    return turns
  if prompt_field not in obj and completion_field not in obj:
    return BadExample(
        MISSING_FIELD,
        f"needs {prompt_field!r} and {completion_field!r}, or {messages_field!r}; the line has {sorted(obj)}",
    )
  prompt = _string(obj, prompt_field, "the prompt")
  if isinstance(prompt, BadExample):
    return prompt
  completion = _string(obj, completion_field, "the completion")
  if isinstance(completion, BadExample):
    return completion
  if not completion.strip():
    return BadExample(BAD_VALUE, f"{completion_field!r} is blank: nothing to train on")
  return [("prompt", prompt), ("completion", completion)]


def classification_pair(
    line: str, *, text_field: str = "text", label_field: str = "label"
) -> tuple[str, int | str] | BadExample:
  """Checks one classification line ``{text_field: str, label_field: int >= 0 or str}``.

  Args:
    line: one line of the file, without its line break.
    text_field: the text's field name.
    label_field: the label's field name.

  Returns:
    ``(text, label)``, or a ``BadExample`` saying what is wrong.

  Example:
    >>> classification_pair('{"text": "great film", "label": "pos"}')
    ('great film', 'pos')
    >>> classification_pair('{"text": "great film", "label": 1.5}')
    BadExample(reason='wrong_type', detail="'label' is a JSON float, expected an integer or a string")
  """
  obj = parse_object(line)
  if isinstance(obj, BadExample):
    return obj
  text = _string(obj, text_field, "the text")
  if isinstance(text, BadExample):
    return text
  if not text.strip():
    return BadExample(BAD_VALUE, f"{text_field!r} is blank")
  if label_field not in obj:
    return BadExample(MISSING_FIELD, f"no {label_field!r} field (the label); the line has {sorted(obj)}")
  label = obj[label_field]
  if isinstance(label, bool) or not isinstance(label, (int, str)):
    return BadExample(WRONG_TYPE, f"{label_field!r} is a JSON {_type(label)}, expected an integer or a string")
  if isinstance(label, int) and label < 0:
    return BadExample(BAD_VALUE, f"{label_field!r} is {label}, expected an integer >= 0")
  if isinstance(label, str) and not label:
    return BadExample(BAD_VALUE, f"{label_field!r} is an empty string")
  return text, label
