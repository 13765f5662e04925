"""What each kind of local file holds, and how one checked unit of it is stored as a TFDS example.

A kind reads units of a file (lines or paragraphs), checks each into a value or a ``BadExample``
(``check``), and turns a good value into the stored example (``example``). Every stored example also
keeps ``file`` and ``line`` so that a problem found after tokenization still names its source line.
"""

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from train.data._errors import BAD_VALUE, WRONG_TYPE, BadExample
from train.data._jsonl import classification_pair, instruction_turns
from train.data._units import UNITS, Unit


def _provenance() -> dict[str, tfds.features.FeatureConnector]:
  return {"file": tfds.features.Text(), "line": tfds.features.Tensor(shape=(), dtype=np.int32)}


@dataclasses.dataclass
class InstructionsKind:
  """JSONL instruction data, stored as ``{"role": [str], "content": [str], "file", "line"}``.

  Prompt/completion lines are stored as the two turns ``("prompt", p), ("completion", c)``; chat lines
  as their messages (see ``instruction_turns``).
  """

  prompt_field: str = "prompt"
  completion_field: str = "completion"
  messages_field: str = "messages"
  unit: Unit = "line"

  def check(self, text: str) -> list[tuple[str, str]] | BadExample:
    return instruction_turns(
        text,
        prompt_field=self.prompt_field,
        completion_field=self.completion_field,
        messages_field=self.messages_field,
    )

  def finish_scan(self) -> None:
    pass

  def features(self) -> tfds.features.FeaturesDict:
    text_list = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict({"role": text_list, "content": text_list, **_provenance()})

  def example(self, turns: list[tuple[str, str]]) -> dict[str, Any]:
    return {"role": [role for role, _ in turns], "content": [content for _, content in turns]}


@dataclasses.dataclass
class ClassificationKind:
  """JSONL classification data, stored as ``{"text": str, "label": ClassLabel, "file", "line"}``.

  Labels are all integers or all strings: the first good line decides, and a label of the other type
  is a ``wrong_type`` example. Without ``label_names``, integer labels give classes ``0..max`` (named
  ``"0"``, ``"1"``, ...) and string labels give their sorted set; with ``label_names``, a string label
  must be one of them and an integer label must index them.
  """

  text_field: str = "text"
  label_field: str = "label"
  label_names: tuple[str, ...] | None = None
  unit: Unit = "line"
  _label_type: type | None = dataclasses.field(default=None, init=False, repr=False)
  _seen: set = dataclasses.field(default_factory=set, init=False, repr=False)

  def check(self, text: str) -> tuple[str, int | str] | BadExample:
    pair = classification_pair(text, text_field=self.text_field, label_field=self.label_field)
    if isinstance(pair, BadExample):
      return pair
    label = pair[1]
    if self._label_type is None:
      self._label_type = type(label)
    elif not isinstance(label, self._label_type):
      first = "integers" if self._label_type is int else "strings"
      return BadExample(WRONG_TYPE, f"label {label!r}: earlier labels are {first}, labels must not mix types")
    if self.label_names is not None:
      if isinstance(label, str) and label not in self.label_names:
        return BadExample(BAD_VALUE, f"label {label!r} is not one of label_names {list(self.label_names)}")
      if isinstance(label, int) and label >= len(self.label_names):
        return BadExample(BAD_VALUE, f"label {label} is out of range for {len(self.label_names)} label_names")
    self._seen.add(label)
    return pair

  def finish_scan(self) -> None:
    if self.label_names is None and self._seen:
      if self._label_type is int:
        self.label_names = tuple(str(i) for i in range(max(self._seen) + 1))
      else:
        self.label_names = tuple(sorted(self._seen))

  def features(self) -> tfds.features.FeaturesDict:
    if self.label_names is None:
      raise RuntimeError("ClassificationKind.features() needs the label names: scan the files first.")
    return tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=list(self.label_names)), **_provenance()}
    )

  def example(self, pair: tuple[str, int | str]) -> dict[str, Any]:
    text, label = pair
    return {"text": text, "label": label if isinstance(label, int) else self.label_names.index(label)}


@dataclasses.dataclass
class TextKind:
  """Plain text, one example per ``unit`` (line, paragraph or document), stored as ``{"text", "file", "line"}``."""

  unit: Unit = "line"

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}.")

  def check(self, text: str) -> str:
    return text

  def finish_scan(self) -> None:
    pass

  def features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"text": tfds.features.Text(), **_provenance()})

  def example(self, text: str) -> dict[str, Any]:
    return {"text": text}
