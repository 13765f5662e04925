"""One reading path (train/data/_source.py): our datasets and registered TFDS datasets, by builder or by name."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

from train.data import DataError, build_text, data_source, default_template, lm_batches

QA = [("two plus two", "four"), ("one plus one", "two"), ("two plus one", "three"), ("one plus two", "three")]


class JloraTestArithmetic(tfds.core.GeneratorBasedBuilder):
  """A registered dataset (``jlora_test_arithmetic``), as a user's or the TFDS catalog's would be."""

  VERSION = tfds.core.Version("1.2.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                                           "completion": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(QA[:3]), "test": self._generate_examples(QA[3:])}

  def _generate_examples(self, pairs):
    for i, (prompt, completion) in enumerate(pairs):
      yield i, {"prompt": prompt, "completion": completion}


def _tokenizer():
  words = ["<pad>", "</s>", "one", "two", "three", "four", "plus"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(words[:2])
  return tok


@pytest.fixture(scope="module")
def arithmetic_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.builder("jlora_test_arithmetic", data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_registered_dataset_by_name(arithmetic_dir):
  source = data_source("jlora_test_arithmetic", "train", data_dir=arithmetic_dir)
  assert len(source) == 3
  assert {(r["prompt"], r["completion"]) for r in source} == {(p.encode(), c.encode()) for p, c in QA[:3]}
  assert source.dataset_info.full_name == "jlora_test_arithmetic/1.2.0"
  assert len(data_source("jlora_test_arithmetic:1.2.0", "test", data_dir=arithmetic_dir)) == 1
  assert len(data_source("jlora_test_arithmetic", "train[:2]", data_dir=arithmetic_dir)) == 2


def test_registered_dataset_goes_through_the_same_batches(arithmetic_dir):
  source = data_source("jlora_test_arithmetic", "test", data_dir=arithmetic_dir)
  batch = next(lm_batches(source, _tokenizer(), seq_len=6, batch_size=1, template=default_template("</s>")))
  # one plus two | three </s>: ids 2 6 3 | 4 1, trained from "three" on.
  np.testing.assert_array_equal(batch["inputs"], [[2, 6, 3, 4, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[6, 3, 4, 1, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 0, 0]])


def test_our_dataset_by_builder_and_by_name_are_the_same(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("one two\nthree\nfour plus one\n")
  builder = build_text({"train": path}, tmp_path / "tfds", name="corpus")
  by_builder = data_source(builder, "train")
  by_name = data_source("jlora_text/corpus", "train", data_dir=tmp_path / "tfds")
  assert type(by_builder) is type(by_name)
  assert [r["text"] for r in by_name] == [r["text"] for r in by_builder] == [b"one two", b"three", b"four plus one"]
  assert by_name.dataset_info.metadata["skipped"] == {}
  assert len(data_source("jlora_text/corpus:1.0.0", "train[1:]", data_dir=tmp_path / "tfds")) == 2


def test_missing_dataset_and_unprepared_builder_are_errors(tmp_path):
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    data_source("jlora_text/nothing_here", "train", data_dir=tmp_path)
  builder = tfds.builder("jlora_test_arithmetic", data_dir=tmp_path / "empty", file_format="array_record")
  with pytest.raises(DataError, match="is not prepared"):
    data_source(builder, "train")
