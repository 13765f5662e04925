"""Stored records to tokenized examples, a batch of records at a time; bad ones become ``BadExample``.

Records are what a data source returns: our builders' ``{"role", "content"}`` / ``{"text"}`` /
``{"text", "label"}`` (text as bytes), or any registered dataset's fields. This is where examples
that are too long for ``seq_len`` are found, since that needs the tokenizer.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from train.data._errors import BAD_VALUE, MISSING_FIELD, NO_TARGET, OVER_LONG, WRONG_TYPE, BadExample
from train.data._packing import ClassificationExample, LMExample
from train.data._template import ChatTemplate, TokenizedTemplate

TurnsFn = Callable[[Mapping[str, Any]], Sequence[tuple[str, str]]]


def _text(value: Any) -> str | None:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.bytes_):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  return None


def record_turns(record: Mapping[str, Any]) -> list[tuple[str, str]] | BadExample:
  """The ``(role, content)`` turns of a stored record.

  Understands ``{"role": [...], "content": [...]}`` (instruction datasets), ``{"prompt", "completion"}``
  and ``{"text"}`` (plain text, role ``"text"``). Other layouts need a ``turns_fn``.

  Example:
    >>> record_turns({"role": [b"user", b"assistant"], "content": [b"hi", b"hello"]})
    [('user', 'hi'), ('assistant', 'hello')]
    >>> record_turns({"text": b"once upon a time"})
    [('text', 'once upon a time')]
  """
  if "role" in record and "content" in record:
    roles, contents = list(record["role"]), list(record["content"])
    if len(roles) != len(contents):
      return BadExample(BAD_VALUE, f"{len(roles)} roles but {len(contents)} contents")
    pairs = [(_text(r), _text(c)) for r, c in zip(roles, contents)]
  elif "prompt" in record and "completion" in record:
    pairs = [("prompt", _text(record["prompt"])), ("completion", _text(record["completion"]))]
  elif "text" in record:
    pairs = [("text", _text(record["text"]))]
  else:
    return BadExample(
        MISSING_FIELD,
        f"the record has fields {sorted(record)}; expected 'role'+'content', 'prompt'+'completion' or 'text' "
        "(or pass turns_fn)",
    )
  if any(role is None or content is None for role, content in pairs):
    return BadExample(WRONG_TYPE, "roles and contents must be strings or bytes")
  return pairs


def chat_template_turns(render: Callable[[list[dict[str, str]]], str]) -> TurnsFn:
  """A ``turns_fn`` that renders chat records with a checkpoint's own chat template (e.g. its Jinja one).

  Every message but the last becomes one untrained ``"prompt"`` turn, ``render(messages)``: the
  template's text up to and including the header of the assistant's answer (its generation prompt).
  The last message, which must be the assistant's, becomes the trained ``"completion"`` turn, so with
  ``default_template(end_token)`` an example is ``render(messages[:-1]) | answer | end_token``: exactly
  the template's own rendering of the whole chat for templates that close a turn with ``end_token``.
  Only the last assistant message is trained.

  Args:
    render: messages ``[{"role", "content"}, ...]`` -> prompt text, e.g.
      ``lambda m: jlora.models.apply_chat_template(path, m, add_generation_prompt=True)``.

  Returns:
    ``record -> [("prompt", text), ("completion", answer)]``, or a ``BadExample`` (reason
    ``bad_value``) for a record whose last message is not the assistant's.

  Example:
    >>> turns = chat_template_turns(lambda m: "".join(f"<{x['role']}>{x['content']}" for x in m) + "<assistant>")
    >>> turns({"role": [b"user", b"assistant"], "content": [b"hi", b"hello"]})
    [('prompt', '<user>hi<assistant>'), ('completion', 'hello')]
  """

  def turns(record: Mapping[str, Any]) -> list[tuple[str, str]] | BadExample:
    pairs = record_turns(record)
    if isinstance(pairs, BadExample):
      return pairs
    if pairs[-1][0] != "assistant":
      return BadExample(BAD_VALUE, f"the last message is the {pairs[-1][0]!r} one; a chat rendered with the "
                        "model's template must end with the assistant's answer")
    return [("prompt", render([{"role": role, "content": content} for role, content in pairs[:-1]])),
            ("completion", pairs[-1][1])]

  return turns


class LMEncoder:
  """Records -> ``LMExample`` (template rendering + tokenization), or ``BadExample``.

  Bad: a role the template lacks (``bad_value``), more than ``seq_len + 1`` tokens (``over_long``: an
  example of ``n`` tokens takes ``n - 1`` positions), or no trained target token (``no_target_tokens``).
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      template: ChatTemplate,
      seq_len: int,
      turns_fn: TurnsFn | None = None,
  ):
    self.template = TokenizedTemplate(template, tokenizer)
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.turns_fn = turns_fn or record_turns

  def __call__(self, records: Sequence[Mapping[str, Any]]) -> list[LMExample | BadExample]:
    results: list[Any] = []
    contents: list[str] = []
    for record in records:
      turns = self.turns_fn(record)
      if not isinstance(turns, BadExample):
        turns = self.template.check_roles([role for role, _ in turns]) or list(turns)
      if not isinstance(turns, BadExample):
        contents.extend(content for _, content in turns)
      results.append(turns)
    encodings = iter(self.tokenizer.encode_batch(contents, add_special_tokens=False))
    for i, turns in enumerate(results):
      if isinstance(turns, BadExample):
        continue
      example = self.template.assemble([(role, next(encodings).ids) for role, _ in turns])
      if example.num_positions > self.seq_len:
        results[i] = BadExample(
            OVER_LONG,
            f"{len(example.ids)} tokens need {example.num_positions} positions, more than seq_len={self.seq_len}",
        )
      elif not example.trained[1:].any():
        results[i] = BadExample(NO_TARGET, "no token to train on after tokenization (empty completion?)")
      else:
        results[i] = example
    return results


class ClassificationEncoder:
  """Records ``{text_field, label_field}`` -> ``ClassificationExample``, or ``BadExample``.

  Text is tokenized with the tokenizer's special tokens (``[CLS] ... [SEP]`` for BERT). Bad: a missing
  field, a label that is not an integer in ``[0, num_classes)``, or more than ``seq_len`` tokens.
  """

  def __init__(
      self,
      tokenizer: tokenizers.Tokenizer,
      seq_len: int,
      *,
      text_field: str = "text",
      label_field: str = "label",
      num_classes: int | None = None,
  ):
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.text_field = text_field
    self.label_field = label_field
    self.num_classes = num_classes

  def _check(self, record: Mapping[str, Any]) -> tuple[str, int] | BadExample:
    for field in (self.text_field, self.label_field):
      if field not in record:
        return BadExample(MISSING_FIELD, f"no {field!r} field; the record has {sorted(record)}")
    text, label = _text(record[self.text_field]), record[self.label_field]
    if text is None:
      return BadExample(WRONG_TYPE, f"{self.text_field!r} is {type(record[self.text_field]).__name__}, expected text")
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
      return BadExample(WRONG_TYPE, f"{self.label_field!r} is {type(label).__name__}, expected an integer class index")
    if label < 0 or (self.num_classes is not None and label >= self.num_classes):
      return BadExample(BAD_VALUE, f"label {int(label)} is outside [0, {self.num_classes})")
    return text, int(label)

  def __call__(self, records: Sequence[Mapping[str, Any]]) -> list[ClassificationExample | BadExample]:
    results: list[Any] = [self._check(record) for record in records]
    texts = [r[0] for r in results if not isinstance(r, BadExample)]
    encodings = iter(self.tokenizer.encode_batch(texts, add_special_tokens=True))
    for i, checked in enumerate(results):
      if isinstance(checked, BadExample):
        continue
      encoding = next(encodings)
      if len(encoding.ids) > self.seq_len:
        results[i] = BadExample(OVER_LONG, f"{len(encoding.ids)} tokens, more than seq_len={self.seq_len}")
      else:
        results[i] = ClassificationExample(
            np.asarray(encoding.ids, np.int32), np.asarray(encoding.type_ids, np.int32), checked[1]
        )
    return results
