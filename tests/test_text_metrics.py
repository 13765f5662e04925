"""train.text_metrics: exact match and ROUGE-L F1, against hand-computed values and a brute-force LCS."""

import functools
import random

import pytest

from train import text_metrics


def test_words_ignore_case_punctuation_and_spacing():
  assert text_metrics.words("  Return the\tsquare-root of `x`, please.\n") == [
      "return", "the", "square", "root", "of", "x", "please"]
  assert text_metrics.words("get_type_hints(obj)") == ["get_type_hints", "obj"]
  assert text_metrics.words("...") == []


def test_hand_computed_rouge_l():
  # answer:    return the square root of x                     (6 words)
  # reference: return the square root of z a complex number    (9 words)
  # LCS = "return the square root of" = 5; P = 5/6, R = 5/9; F1 = 2PR/(P+R) = (50/54)/(25/18) = 2/3.
  answer, reference = "Return the square root of x.", "Return the square root of z, a complex number."
  assert text_metrics.lcs_length(text_metrics.words(answer), text_metrics.words(reference)) == 5
  assert text_metrics.rouge_l(answer, reference) == pytest.approx(2 / 3, abs=1e-12)
  assert text_metrics.exact_match(answer, reference) == 0.0
  # Order matters: "b a c d" vs "a b c d e" share at most 3 words in order (b c d, or a c d); P = 3/4, R = 3/5,
  # F1 = (2 * 9/20) / (27/20) = 2/3 again.
  assert text_metrics.rouge_l("b a c d", "a b c d e") == pytest.approx(2 / 3, abs=1e-12)
  assert text_metrics.rouge_l("Return X", "return x.") == 1.0
  assert text_metrics.exact_match("Return X", "return x.") == 1.0
  assert text_metrics.rouge_l("", "return x") == 0.0
  assert text_metrics.rouge_l("foo bar", "baz") == 0.0


def test_corpus_scores_are_means():
  scores = text_metrics.corpus_scores(["Return x.", "b a c d", "nothing"], ["return x", "a b c d e", "else"])
  assert scores == pytest.approx({"exact_match": 1 / 3, "rouge_l": (1 + 2 / 3 + 0) / 3})
  with pytest.raises(ValueError, match="equally many"):
    text_metrics.corpus_scores(["a"], [])


def _brute_force_lcs(a: tuple, b: tuple) -> int:
  @functools.cache
  def lcs(i: int, j: int) -> int:
    if i == len(a) or j == len(b):
      return 0
    if a[i] == b[j]:
      return 1 + lcs(i + 1, j + 1)
    return max(lcs(i + 1, j), lcs(i, j + 1))

  return lcs(0, 0)


def test_lcs_matches_the_recursive_definition():
  rng = random.Random(0)
  for _ in range(300):
    a = tuple(rng.choice("abcd") for _ in range(rng.randrange(0, 9)))
    b = tuple(rng.choice("abcd") for _ in range(rng.randrange(0, 9)))
    assert text_metrics.lcs_length(a, b) == _brute_force_lcs(a, b), (a, b)


def test_docstring_examples():
  import doctest

  result = doctest.testmod(text_metrics, report=True)
  assert result.attempted >= 3 and result.failed == 0
