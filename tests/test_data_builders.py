"""TFDS datasets from local files (train/data/_builders.py): contents, splits, bad input in both modes, reuse."""

import json
import logging
import re

import numpy as np
import pytest

from train.data import DataError, build_jsonl_classification, build_jsonl_instructions, build_text, data_source


def _jsonl(path, *objects_or_lines):
  lines = [o if isinstance(o, str) else json.dumps(o) for o in objects_or_lines]
  path.write_text("\n".join(lines) + "\n")
  return path


def _pc(i):
  return {"prompt": f"p{i}", "completion": f"c{i}"}


def _records(builder, split):
  return list(data_source(builder, split))


def _decode(values):
  return [v.decode() for v in values]


def _skip_warnings(caplog):
  return [r for r in caplog.records if r.levelno == logging.WARNING and "skipped while building" in r.getMessage()]


def test_instructions_are_stored_as_turns_in_file_order(tmp_path):
  train = _jsonl(tmp_path / "train.jsonl",
                 {"prompt": "2+2=", "completion": "4"},
                 {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]},
                 {"prompt": "", "completion": "free text"})
  valid = _jsonl(tmp_path / "valid.jsonl", {"prompt": "a", "completion": "y", "extra": 1})
  builder = build_jsonl_instructions({"train": train, "validation": [valid]}, tmp_path / "tfds", name="sft")
  records = _records(builder, "train")
  assert [_decode(r["role"]) for r in records] == [
      ["prompt", "completion"], ["system", "user", "assistant"], ["prompt", "completion"]]
  assert [_decode(r["content"]) for r in records] == [["2+2=", "4"], ["be nice", "hi", "hello"], ["", "free text"]]
  assert [(r["file"].decode(), int(r["line"])) for r in records] == [(str(train), 1), (str(train), 2), (str(train), 3)]
  (record,) = _records(builder, "validation")
  assert _decode(record["content"]) == ["a", "y"]
  assert builder.info.metadata["skipped"] == {}
  assert builder.data_dir == str(tmp_path / "tfds" / "jlora_jsonl_instructions" / "sft" / "1.0.0")


def test_custom_field_names(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", {"question": "q", "answer": "a"},
                {"chat": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]})
  builder = build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="f", prompt_field="question",
                                     completion_field="answer", messages_field="chat")
  assert [_decode(r["content"]) for r in _records(builder, "train")] == [["q", "a"], ["u", "v"]]


def test_holdout_is_deterministic_disjoint_and_exact(tmp_path):
  path = _jsonl(tmp_path / "all.jsonl", *[_pc(i) for i in range(20)])

  def split_lines(name, seed):
    builder = build_jsonl_instructions({"train": path}, tmp_path / "tfds", name=name, holdout_fraction=0.25,
                                       holdout_split="dev", holdout_seed=seed)
    return {s: sorted(int(r["line"]) for r in _records(builder, s)) for s in ("train", "dev")}

  first = split_lines("a", seed=0)
  assert len(first["dev"]) == 5 and len(first["train"]) == 15
  assert sorted(first["dev"] + first["train"]) == list(range(1, 21))
  # The held-out choice is a permutation drawn from the seed, independent of the dataset's name.
  held = np.zeros(20, bool)
  held[np.random.default_rng(0).permutation(20)[:5]] = True
  assert first["dev"] == [i + 1 for i in np.flatnonzero(held)]
  assert split_lines("b", seed=0) == first
  assert split_lines("c", seed=1) != first


def test_holdout_errors(tmp_path):
  path = _jsonl(tmp_path / "all.jsonl", *[_pc(i) for i in range(3)])
  with pytest.raises(DataError, match=r"holdout_fraction=0\.1 of 3 good examples of split 'train' leaves an empty"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="h", holdout_fraction=0.1)
  with pytest.raises(ValueError, match=r"holdout_split='test' already has files"):
    build_jsonl_instructions({"train": path, "test": path}, tmp_path / "tfds", name="h", holdout_fraction=0.5,
                             holdout_split="test")
  with pytest.raises(ValueError, match=r"holdout_from='all' is not one of the splits \['train'\]"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="h", holdout_fraction=0.5, holdout_from="all")
  with pytest.raises(ValueError, match=r"holdout_fraction must be in \[0, 1\)"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="h", holdout_fraction=1.0)


# (line content, reason) for every kind of bad line; each is line 2 of a file with good lines 1 and 3.
BAD_INSTRUCTION_LINES = [
    ('{"prompt": "a", "completion": ', "malformed_json"),
    ('{"prompt": "a"}', "missing_field"),
    ('{"prompt": "a", "completion": 7}', "wrong_type"),
    ('[1, 2]', "wrong_type"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "bad_value"),
]


@pytest.mark.parametrize("bad_line, reason", BAD_INSTRUCTION_LINES)
def test_bad_line_raises_naming_file_line_and_reason(tmp_path, bad_line, reason):
  path = _jsonl(tmp_path / "data.jsonl", _pc(1), bad_line, _pc(3))
  with pytest.raises(DataError) as e:
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="r")
  assert str(e.value).startswith(f"{path}:2: {reason}: ")
  assert "on_bad_example='skip'" in str(e.value)
  assert (e.value.reason, e.value.where) == (reason, f"{path}:2")
  assert not (tmp_path / "tfds" / "jlora_jsonl_instructions" / "r").exists()  # nothing written


def test_invalid_utf8_line_raises(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid_utf8: the line is not valid UTF-8"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="u")


def test_skip_mode_counts_every_reason_and_keeps_good_examples(tmp_path, caplog):
  train = tmp_path / "train.jsonl"
  lines = [json.dumps(_pc(0))]
  for bad_line, _ in BAD_INSTRUCTION_LINES:
    lines += [bad_line, ""]  # blank lines are separators, never examples
  lines.append(json.dumps(_pc(11)))
  train.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n" + json.dumps(_pc(13)).encode() + b"\n")
  valid = _jsonl(tmp_path / "valid.jsonl", _pc(20), "{oops", _pc(22))
  with caplog.at_level(logging.WARNING):
    builder = build_jsonl_instructions({"train": train, "validation": valid}, tmp_path / "tfds", name="s",
                                       on_bad_example="skip")
  expected = {"train": {"malformed_json": 1, "missing_field": 1, "wrong_type": 2, "bad_value": 1, "invalid_utf8": 1},
              "validation": {"malformed_json": 1}}
  assert builder.info.metadata["skipped"] == expected
  train_records = _records(builder, "train")
  assert [(_decode(r["content"]), int(r["line"])) for r in train_records] == [
      (["p0", "c0"], 1), (["p11", "c11"], 12), (["p13", "c13"], 14)]
  assert [int(r["line"]) for r in _records(builder, "validation")] == [1, 3]
  (warning,) = _skip_warnings(caplog)
  assert "train: 6 skipped (bad_value: 1, invalid_utf8: 1, malformed_json: 1, missing_field: 1, wrong_type: 2)" in (
      warning.getMessage())
  assert "validation: 1 skipped (malformed_json: 1)" in warning.getMessage()


@pytest.mark.parametrize("on_bad_example", ["raise", "skip"])
def test_empty_file_is_an_error_in_both_modes(tmp_path, on_bad_example):
  good = _jsonl(tmp_path / "good.jsonl", _pc(1))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: the file is empty") as e:
    build_jsonl_instructions({"train": [good, empty]}, tmp_path / "tfds", name="e", on_bad_example=on_bad_example)
  assert e.value.reason == "empty_file"


def test_split_left_without_examples_is_an_error_when_skipping(tmp_path):
  good = _jsonl(tmp_path / "good.jsonl", _pc(1))
  bad = _jsonl(tmp_path / "bad.jsonl", "{", '{"prompt": "x"}')
  with pytest.raises(DataError, match=r"split 'test' has no usable example \(2 skipped \(malformed_json: 1, "
                                      r"missing_field: 1\)\)") as e:
    build_jsonl_instructions({"train": good, "test": bad}, tmp_path / "tfds", name="z", on_bad_example="skip")
  assert e.value.reason == "no_examples"


def test_reuse_clash_and_overwrite(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", _pc(1))
  first = build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="v")
  again = build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="v")  # same contents: reused
  assert again.info.metadata["fingerprint"] == first.info.metadata["fingerprint"]
  _jsonl(path, _pc(1), _pc(2))
  with pytest.raises(DataError, match=r"jlora_jsonl_instructions/v already exists in .* pass overwrite=True") as e:
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="v")
  assert e.value.reason == "exists"
  with pytest.raises(DataError, match="already exists"):  # other options are other data too
    build_jsonl_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "tfds", name="v", prompt_field="q")
  rebuilt = build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="v", overwrite=True)
  assert len(data_source(rebuilt, "train")) == 2
  # Another name is another dataset in the same data_dir.
  other = build_jsonl_instructions({"train": tmp_path / "a.jsonl"}, tmp_path / "tfds", name="w")
  assert len(data_source(other, "train")) == 2


def test_argument_errors(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", _pc(1))
  with pytest.raises(FileNotFoundError, match=r"Split 'train': no such file '.*missing\.jsonl'"):
    build_jsonl_instructions({"train": [path, tmp_path / "missing.jsonl"]}, tmp_path / "tfds", name="x")
  with pytest.raises(ValueError, match=r"Dataset name 'a/b' must match"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="a/b")
  with pytest.raises(ValueError, match=r"Split name 'train\[:5\]' must match"):
    build_jsonl_instructions({"train[:5]": path}, tmp_path / "tfds", name="x")
  with pytest.raises(ValueError, match="on_bad_example must be 'raise' or 'skip'"):
    build_jsonl_instructions({"train": path}, tmp_path / "tfds", name="x", on_bad_example="ignore")


def test_classification_string_labels_become_sorted_class_names(tmp_path):
  train = _jsonl(tmp_path / "train.jsonl", {"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"})
  test = _jsonl(tmp_path / "test.jsonl", {"text": "meh", "label": "neutral"})
  builder = build_jsonl_classification({"train": train, "test": test}, tmp_path / "tfds", name="c")
  assert builder.info.features["label"].names == ["neg", "neutral", "pos"]
  assert [(r["text"], int(r["label"])) for r in _records(builder, "train")] == [(b"good", 2), (b"bad", 0)]
  assert [int(r["label"]) for r in _records(builder, "test")] == [1]


def test_classification_integer_labels_and_given_names(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", {"sentence": "x", "y": 3}, {"sentence": "z", "y": 0})
  builder = build_jsonl_classification({"train": path}, tmp_path / "tfds", name="i", text_field="sentence",
                                       label_field="y")
  assert builder.info.features["label"].names == ["0", "1", "2", "3"]
  assert [int(r["label"]) for r in _records(builder, "train")] == [3, 0]
  named = build_jsonl_classification({"train": path}, tmp_path / "tfds", name="n", text_field="sentence",
                                     label_field="y", label_names=["a", "b", "c", "d", "e"])
  assert named.info.features["label"].names == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("lines, label_names, reason, line", [
    ([{"text": "a", "label": 1}, {"text": "b", "label": "pos"}], None, "wrong_type", 2),  # mixed label types
    ([{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}], ["neg", "pos"], "bad_value", 2),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 2}], ["neg", "pos"], "bad_value", 2),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1.0}], None, "wrong_type", 2),
    ([{"text": "a", "label": 0}, {"text": "b"}], None, "missing_field", 2),
])
def test_classification_bad_labels_in_both_modes(tmp_path, lines, label_names, reason, line):
  path = _jsonl(tmp_path / "a.jsonl", *lines, {"text": "c", "label": lines[0]["label"]})
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: {reason}: "):
    build_jsonl_classification({"train": path}, tmp_path / "tfds", name="r", label_names=label_names)
  builder = build_jsonl_classification({"train": path}, tmp_path / "tfds", name="s", label_names=label_names,
                                       on_bad_example="skip")
  assert builder.info.metadata["skipped"] == {"train": {reason: 1}}
  assert [(r["text"], int(r["line"])) for r in _records(builder, "train")] == [(b"a", 1), (b"c", 3)]


@pytest.mark.parametrize("unit, expected", [
    ("line", [("one", 1), ("two", 2), ("three", 4), ("four", 6)]),
    ("paragraph", [("one\ntwo", 1), ("three", 4), ("four", 6)]),
    ("document", [("one\ntwo\n\nthree\n\nfour", 1)]),
])
def test_text_units(tmp_path, unit, expected):
  path = tmp_path / "a.txt"
  path.write_text("one\ntwo\n\nthree\n\nfour\n")
  builder = build_text({"train": path}, tmp_path / "tfds", name=unit, unit=unit)
  assert [(r["text"].decode(), int(r["line"])) for r in _records(builder, "train")] == expected


def test_text_invalid_utf8_in_both_modes(tmp_path, caplog):
  path = tmp_path / "a.txt"
  path.write_bytes(b"good one\n\nbad \xc3\x28 here\nstill bad paragraph\n\ngood two\n")
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid_utf8: line 3 is not valid UTF-8"):
    build_text({"train": path}, tmp_path / "tfds", name="r", unit="paragraph")
  with caplog.at_level(logging.WARNING):
    builder = build_text({"train": path}, tmp_path / "tfds", name="s", unit="paragraph", on_bad_example="skip")
  assert builder.info.metadata["skipped"] == {"train": {"invalid_utf8": 1}}
  assert [r["text"] for r in _records(builder, "train")] == [b"good one", b"good two"]
  assert len(_skip_warnings(caplog)) == 1
