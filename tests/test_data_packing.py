"""Packing and padding rows (train/data/_packing.py) against arrays written out by hand."""

import numpy as np
import pytest

from train.data import DataError, LMExample, pack_lm_examples
from train.data._packing import ClassificationExample, classification_rows, lm_rows


def _example(ids, trained):
  return LMExample(np.array(ids, np.int32), np.array(trained, bool))


def _assert_rows(rows, expected):
  assert set(rows) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(rows[name], np.array(value, np.int32), err_msg=name)
    assert rows[name].dtype == np.int32, name


def test_pack_three_examples_into_two_rows():
  # a: prompt 11 12, completion 13, end 2 -> 4 tokens, 3 positions
  a = _example([11, 12, 13, 2], [0, 0, 1, 1])
  # b: prompt 14, completion 15 16, end 2 -> 4 tokens, 3 positions (does not fit after a in 5 positions)
  b = _example([14, 15, 16, 2], [0, 1, 1, 1])
  # c: 2 tokens, 1 position: fits after b
  c = _example([17, 2], [0, 1])
  rows = pack_lm_examples([a, b, c], seq_len=5)
  _assert_rows(rows, {
      "inputs":      [[11, 12, 13, 0, 0], [14, 15, 16, 17, 0]],
      "targets":     [[12, 13, 2, 0, 0], [15, 16, 2, 2, 0]],
      "loss_mask":   [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
      "segment_ids": [[1, 1, 1, 0, 0], [1, 1, 1, 2, 0]],
      "positions":   [[0, 1, 2, 0, 0], [0, 1, 2, 0, 0]],
  })


def test_pack_exact_fit_and_order_kept():
  # Sequential greedy: c would fit in row 0's gap, but examples are never reordered.
  a = _example([5, 6, 7], [0, 1, 1])        # 2 positions
  b = _example([8, 9, 10, 11], [1, 1, 1, 1])  # 3 positions: 2 + 3 > 4 -> new row
  c = _example([12, 13], [0, 1])            # 1 position: fits after b exactly (3 + 1 = 4)
  rows = pack_lm_examples([a, b, c], seq_len=4)
  _assert_rows(rows, {
      "inputs":      [[5, 6, 0, 0], [8, 9, 10, 12]],
      "targets":     [[6, 7, 0, 0], [9, 10, 11, 13]],
      "loss_mask":   [[1, 1, 0, 0], [1, 1, 1, 1]],
      "segment_ids": [[1, 1, 0, 0], [1, 1, 1, 2]],
      "positions":   [[0, 1, 0, 0], [0, 1, 2, 0]],
  })


def test_loss_mask_is_the_flag_of_the_predicted_token():
  # The first token's flag never matters (nothing predicts it); the last token's always does.
  rows = pack_lm_examples([_example([3, 4, 5], [1, 0, 1])], seq_len=3)
  _assert_rows(rows, {
      "inputs": [[3, 4, 0]], "targets": [[4, 5, 0]], "loss_mask": [[0, 1, 0]],
      "segment_ids": [[1, 1, 0]], "positions": [[0, 1, 0]],
  })


def test_over_long_example_is_a_data_error():
  with pytest.raises(DataError, match=r"example 1 needs 4 positions, more than seq_len=3") as e:
    pack_lm_examples([_example([1, 2], [0, 1]), _example([1, 2, 3, 4, 5], [0, 1, 1, 1, 1])], seq_len=3)
  assert e.value.reason == "over_long"


def test_lm_rows_empty_group_is_padding_and_overflow_raises():
  rows = lm_rows([[], [_example([7, 8], [0, 1])]], seq_len=2)
  _assert_rows(rows, {
      "inputs": [[0, 0], [7, 0]], "targets": [[0, 0], [8, 0]], "loss_mask": [[0, 0], [1, 0]],
      "segment_ids": [[0, 0], [1, 0]], "positions": [[0, 0], [0, 0]],
  })
  with pytest.raises(ValueError, match="Row 0 needs 3 positions"):
    lm_rows([[_example([1, 2], [0, 1]), _example([3, 4, 5], [0, 1, 1])]], seq_len=2)


def test_classification_rows_pad_right_and_mark_padding_rows():
  rows = classification_rows(
      [ClassificationExample(np.array([1, 9, 2]), np.array([0, 0, 0]), 3), None,
       ClassificationExample(np.array([1, 2]), np.array([0, 1]), 0)],
      seq_len=4, pad_id=7,
  )
  _assert_rows(rows, {
      "input_ids":      [[1, 9, 2, 7], [7, 7, 7, 7], [1, 2, 7, 7]],
      "attention_mask": [[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]],
      "token_type_ids": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],
      "label":          [3, 0, 0],
      "example_mask":   [1, 0, 1],
  })
