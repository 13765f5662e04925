"""Batches (train/data/_iterator.py): order, exact resume, process sharding, epochs, bad examples found late."""

import json
import logging
import re

import numpy as np
import pytest
import tokenizers

from train.data import (
  DataError,
  build_jsonl_classification,
  build_jsonl_instructions,
  classification_batches,
  data_source,
  default_template,
  lm_batches,
  pack_lm_examples,
  render_chat,
)

N = 23
SEQ_LEN = 16
SPECIAL = ["<pad>", "<unk>", "</s>", "<|user|>", "<|assistant|>", "[CLS]", "[SEP]"]


def _turns(i: int) -> list[tuple[str, str]]:
  """Example i: a unique first word ``w{i}``, then 3..10 tokens in all, some chat-style."""
  prompt = " ".join([f"w{i}"] + ["x"] * (i % 5))
  completion = " ".join(["y"] * (1 + i % 4))
  if i % 3 == 2:
    return [("user", prompt), ("assistant", completion)]
  return [("prompt", prompt), ("completion", completion)]


def _line(turns) -> dict:
  if turns[0][0] == "user":
    return {"messages": [{"role": role, "content": content} for role, content in turns]}
  return {"prompt": turns[0][1], "completion": turns[1][1]}


@pytest.fixture(scope="module")
def tokenizer():
  """A real WordLevel tokenizer trained in-process on the test corpus."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  corpus = [content for i in range(N + 10) for _, content in _turns(i)] + ["z " * 40]
  tok.train_from_iterator(corpus, tokenizers.trainers.WordLevelTrainer(special_tokens=SPECIAL))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
  return tok


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def sft_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("files") / "sft.jsonl"
  path.write_text("".join(json.dumps(_line(_turns(i))) + "\n" for i in range(N)))
  return path


@pytest.fixture(scope="module")
def source(sft_path, data_dir):
  return data_source(build_jsonl_instructions({"train": sft_path}, data_dir, name="sft"), "train")


def _lm(source, tokenizer, **kwargs):
  kwargs = {"seq_len": SEQ_LEN, "batch_size": 4, "template": default_template("</s>"), **kwargs}
  return lm_batches(source, tokenizer, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for i, (a, e) in enumerate(zip(actual, expected)):
    assert a.keys() == e.keys()
    for name in e:
      np.testing.assert_array_equal(a[name], e[name], err_msg=f"batch {i} {name}")


def _example_ids(batch, tokenizer) -> list[int]:
  """The example numbers i in a batch, read from the unique first token ``w{i}`` of each segment."""
  tokens = [tokenizer.id_to_token(int(t)) for t in batch["inputs"][batch["segment_ids"] > 0]]  # row-major order
  return [int(token[1:]) for token in tokens if re.fullmatch(r"w\d+", token)]


def test_literal_batches_of_a_small_stream(tokenizer):
  source = [{"prompt": b"w1", "completion": b"y y"}, {"text": b"x x x x"}, {"prompt": b"w2 x", "completion": b"y"}]
  iterator = lm_batches(source, tokenizer, seq_len=6, batch_size=2, template=default_template("</s>"),
                        shuffle=False, num_epochs=1)
  w1, w2, x, y, eos = (tokenizer.token_to_id(t) for t in ["w1", "w2", "x", "y", "</s>"])
  # w1 y y </s> (3 positions) + x x x x </s> (4) > 6 -> row 2; w2 x y </s> (3) does not fit after it -> row 3,
  # which opens batch 2 (padded with an empty row: the stream ends).
  batch = next(iterator)
  np.testing.assert_array_equal(batch["inputs"], [[w1, y, y, 0, 0, 0], [x, x, x, x, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[y, y, eos, 0, 0, 0], [x, x, x, eos, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0]])
  assert iterator.get_state() == {"epoch": 0, "position": 2, "seed": 0, "shuffle": False, "num_examples": 3,
                                  "skipped": {}}
  batch = next(iterator)
  np.testing.assert_array_equal(batch["inputs"], [[w2, x, y, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 0, 0], [0] * 6])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0, 0, 0], [0] * 6])
  for _ in range(2):
    with pytest.raises(StopIteration):
      next(iterator)


def test_first_epoch_is_the_seeded_permutation_packed_in_order(source, tokenizer):
  """An independent reference: numpy's permutation of the raw turns, rendered and packed with the public pieces."""
  template = default_template("</s>")
  for seed in (0, 7):
    order = np.random.default_rng([seed, 0]).permutation(N)
    expected = pack_lm_examples([render_chat(_turns(int(i)), template, tokenizer) for i in order], SEQ_LEN)
    batches = list(_lm(source, tokenizer, seed=seed, num_epochs=1))
    rows = {name: np.concatenate([b[name] for b in batches]) for name in expected}
    used = rows["segment_ids"].any(axis=1)
    assert not used[used.sum():].any()  # only the last batch has padding rows, at its end
    for name in expected:
      np.testing.assert_array_equal(rows[name][used], expected[name], err_msg=f"seed {seed} {name}")
    assert [i for b in batches for i in _example_ids(b, tokenizer)] == order.tolist()


def test_same_seed_same_order_other_seed_other_order(source, tokenizer):
  first = _take(_lm(source, tokenizer, seed=3), 6)
  _assert_batches_equal(_take(_lm(source, tokenizer, seed=3), 6), first)
  other = _take(_lm(source, tokenizer, seed=4), 6)
  assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))
  # Each epoch has its own order, as the iterator delivers it: a permutation of all N, another every epoch and
  # for every seed, numpy's permutation for (seed, epoch).
  orders = {}
  for seed in (3, 4):
    seen = [i for batch in _lm(source, tokenizer, seed=seed, num_epochs=2) for i in _example_ids(batch, tokenizer)]
    orders[seed] = [seen[:N], seen[N:]]
    assert len(seen) == 2 * N and all(sorted(order) == list(range(N)) for order in orders[seed])
    assert orders[seed] == [np.random.default_rng([seed, e]).permutation(N).tolist() for e in range(2)]
  assert len({tuple(order) for pair in orders.values() for order in pair}) == 4
  assert orders[3][0] != list(range(N))  # shuffled


def test_every_epoch_visits_every_example_once(source, tokenizer):
  iterator = _lm(source, tokenizer, seed=1, num_epochs=3)
  seen = [i for batch in iterator for i in _example_ids(batch, tokenizer)]
  assert len(seen) == 3 * N
  orders = [np.random.default_rng([1, e]).permutation(N).tolist() for e in range(3)]
  assert seen == orders[0] + orders[1] + orders[2]  # epochs follow each other without a gap


@pytest.mark.parametrize("on_bad_example", ["raise", "skip"])
def test_exact_resume_across_epoch_boundaries(source, tokenizer, on_bad_example):
  total = 10
  reference_iterator = _lm(source, tokenizer, seed=5, on_bad_example=on_bad_example)
  reference, states = [], []
  for _ in range(total):
    states.append(reference_iterator.get_state())
    reference.append(next(reference_iterator))
  assert max(s["epoch"] for s in states) >= 3  # the run crosses several epoch boundaries
  assert any(s["epoch"] > 0 and s["position"] > 0 for s in states)  # and resumes mid-epoch too
  for k in range(total):
    first = _lm(source, tokenizer, seed=5, on_bad_example=on_bad_example)
    _assert_batches_equal(_take(first, k), reference[:k])
    state = json.loads(json.dumps(first.get_state()))
    assert state == states[k]
    resumed = _lm(source, tokenizer, seed=5, on_bad_example=on_bad_example)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, total - k), reference[k:])


def test_resume_with_another_batch_size_or_process_count_continues_the_same_rows(source, tokenizer):
  reference = _take(_lm(source, tokenizer, seed=2, batch_size=4), 6)
  rows = np.concatenate([b["inputs"] for b in reference])
  first = _lm(source, tokenizer, seed=2, batch_size=4)
  _take(first, 2)
  resumed = _lm(source, tokenizer, seed=2, batch_size=2)
  resumed.set_state(first.get_state())
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in _take(resumed, 8)]), rows[8:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_the_global_batch(source, tokenizer, process_count):
  def run(num_epochs, process_index=0, count=1):
    iterator = _lm(source, tokenizer, seed=9, batch_size=8, num_epochs=num_epochs, process_index=process_index,
                   process_count=count)
    return _take(iterator, 5) if num_epochs is None else list(iterator)

  for num_epochs in (None, 1):  # many epochs: rows agree; one epoch: every example is in exactly one slice
    reference = run(num_epochs)
    shards = [run(num_epochs, p, process_count) for p in range(process_count)]
    assert all(len(shard) == len(reference) for shard in shards)
    for b, global_batch in enumerate(reference):
      for name in global_batch:
        assert all(shard[b][name].shape == (8 // process_count, SEQ_LEN) for shard in shards)
        np.testing.assert_array_equal(np.concatenate([shard[b][name] for shard in shards]), global_batch[name])
  per_process = [[i for batch in shard for i in _example_ids(batch, tokenizer)] for shard in shards]
  assert sorted(sum(per_process, [])) == list(range(N))  # disjoint, and together the whole epoch


def test_classification_process_slices_are_disjoint(tmp_path, tokenizer):
  path = tmp_path / "cls.jsonl"
  path.write_text("".join(json.dumps({"text": f"w{i} x", "label": i}) + "\n" for i in range(N)))
  source = data_source(build_jsonl_classification({"train": path}, tmp_path / "tfds", name="c"), "train")
  kwargs = {"seq_len": 5, "batch_size": 6, "pad_token": "<pad>", "seed": 1, "num_epochs": 1}
  reference = list(classification_batches(source, tokenizer, **kwargs))
  assert len(reference) == 4 and reference[-1]["example_mask"].tolist() == [1] * 5 + [0]  # 23 = 3 * 6 + 5
  order = np.random.default_rng([1, 0]).permutation(N).tolist()
  assert [int(label) for b in reference for label, m in zip(b["label"], b["example_mask"]) if m] == order
  cls, sep, x = (tokenizer.token_to_id(t) for t in ["[CLS]", "[SEP]", "x"])
  first = order[0]
  np.testing.assert_array_equal(reference[0]["input_ids"][0], [cls, tokenizer.token_to_id(f"w{first}"), x, sep, 0])
  np.testing.assert_array_equal(reference[0]["attention_mask"][0], [1, 1, 1, 1, 0])
  shards = [list(classification_batches(source, tokenizer, process_index=p, process_count=3, **kwargs))
            for p in range(3)]
  for b, global_batch in enumerate(reference):
    labels = [shard[b]["label"][shard[b]["example_mask"] == 1].tolist() for shard in shards]
    assert sum(labels, []) == global_batch["label"][global_batch["example_mask"] == 1].tolist()
    assert len(set(sum(labels, []))) == len(sum(labels, []))


@pytest.fixture(scope="module")
def long_source(tmp_path_factory, data_dir):
  """N good examples plus over-long ones at lines 4 and 10 (20 completion tokens > SEQ_LEN positions)."""
  path = tmp_path_factory.mktemp("files") / "long.jsonl"
  lines = [json.dumps(_line(_turns(i))) for i in range(N)]
  lines.insert(3, json.dumps({"prompt": "w30", "completion": " ".join(["z"] * 20)}))
  lines.insert(9, json.dumps({"messages": [{"role": "user", "content": "w31"},
                                            {"role": "assistant", "content": " ".join(["z"] * 20)}]}))
  path.write_text("\n".join(lines) + "\n{broken\n")
  builder = build_jsonl_instructions({"train": path}, data_dir, name="long", on_bad_example="skip")
  return path, data_source(builder, "train")


def test_over_long_raises_naming_file_and_line(long_source, tokenizer):
  path, source = long_source
  iterator = _lm(source, tokenizer, shuffle=False)
  with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: over_long: 22 tokens need 21 positions, more "
                                      rf"than seq_len={SEQ_LEN} \(on_bad_example='skip' skips") as e:
    _take(iterator, 3)
  assert e.value.reason == "over_long"


def test_over_long_skipped_counted_once_and_good_examples_intact(long_source, tokenizer, caplog):
  _, source = long_source
  with caplog.at_level(logging.WARNING):
    iterator = _lm(source, tokenizer, seed=4, num_epochs=2, on_bad_example="skip")
    seen = [i for batch in iterator for i in _example_ids(batch, tokenizer)]
  assert sorted(seen) == sorted(list(range(N)) * 2)  # every good example, each epoch; none of w30, w31
  assert iterator.skipped == {"malformed_json": 1, "over_long": 2}  # distinct examples, not per epoch
  assert iterator.get_state()["skipped"] == {"over_long": 2}
  assert iterator.report() == (
      "jlora_jsonl_instructions/long/1.0.0[train]: when built 1 skipped (malformed_json: 1); "
      "after tokenization 2 skipped (over_long: 2)")
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipping bad examples" in r.getMessage()]
  assert len(warnings) == 1 and "over_long" in warnings[0].getMessage()


def test_all_examples_skipped_is_an_error(tokenizer):
  source = [{"text": " ".join(["z"] * 30)}] * 3
  iterator = lm_batches(source, tokenizer, seq_len=8, batch_size=1, template=default_template("</s>"),
                        on_bad_example="skip")
  with pytest.raises(DataError, match=r"every one of the 3 examples of list was skipped \(3 skipped \(over_long: 3"):
    next(iterator)


def test_records_without_file_are_named_by_index(tokenizer):
  source = [{"text": "x"}, {"question": "x"}]
  iterator = lm_batches(source, tokenizer, seq_len=8, batch_size=1, template=default_template("</s>"), shuffle=False)
  with pytest.raises(DataError, match=r"^list example 1: missing_field: the record has fields \['question'\]"):
    _take(iterator, 2)


def test_state_errors(source, tokenizer):
  iterator = _lm(source, tokenizer, seed=1)
  state = iterator.get_state()
  with pytest.raises(ValueError, match=r"saved with seed=1, this iterator has seed=2"):
    _lm(source, tokenizer, seed=2).set_state(state)
  with pytest.raises(ValueError, match=r"saved with shuffle=True, this iterator has shuffle=False"):
    _lm(source, tokenizer, seed=1, shuffle=False).set_state(state)
  with pytest.raises(ValueError, match="must have keys"):
    iterator.set_state({"epoch": 0})
  with pytest.raises(ValueError, match="outside the data source"):
    iterator.set_state({**state, "position": N})


def test_argument_errors(source, tokenizer):
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of process_count=4"):
    _lm(source, tokenizer, batch_size=6, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    _lm(source, tokenizer, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="num_epochs must be None"):
    _lm(source, tokenizer, num_epochs=0)
  with pytest.raises(DataError, match="has no example"):
    _lm([], tokenizer)
  with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer's vocabulary"):
    classification_batches(source, tokenizer, seq_len=4, batch_size=2, pad_token="<nope>")
