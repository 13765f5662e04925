"""Generation metrics: exact match and ROUGE-L F1 between a model's answer and a reference text.

Both compare *words*: a text is lower-cased and split into its runs of letters and digits
(``\\w+``), so case, punctuation and spacing never count. Exact match asks for the same word sequence;
ROUGE-L F1 (Lin, 2004) scores the longest common subsequence (LCS) of the two word sequences:
``P = LCS / len(answer)``, ``R = LCS / len(reference)``, ``F1 = 2PR / (P + R)`` (0 when the LCS is empty).

Example:
  >>> words("Return the square-root of x.")
  ['return', 'the', 'square', 'root', 'of', 'x']
  >>> exact_match("Return x.", "return  X")
  1.0
  >>> round(rouge_l("the cat sat on the mat", "the cat is on the mat"), 4)   # LCS 5 of 6 and 6 words
  0.8333
"""

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
  """The lower-cased words (``\\w+`` runs) of ``text``."""
  return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """The length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, one row)."""
  if len(a) < len(b):
    a, b = b, a
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0  # row[j - 1] of the previous row
    for j, y in enumerate(b, start=1):
      above = row[j]
      row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
      diagonal = above
  return row[-1]


def exact_match(answer: str, reference: str) -> float:
  """1.0 if the two texts have the same words (see the module docstring), else 0.0."""
  return float(words(answer) == words(reference))


def rouge_l(answer: str, reference: str) -> float:
  """ROUGE-L F1 of ``answer`` against ``reference`` over their words; 0.0 if either has none."""
  answer_words, reference_words = words(answer), words(reference)
  common = lcs_length(answer_words, reference_words)
  if common == 0:
    return 0.0
  precision, recall = common / len(answer_words), common / len(reference_words)
  return 2 * precision * recall / (precision + recall)


def corpus_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ``exact_match`` and ``rouge_l`` over pairs: ``{"exact_match": ..., "rouge_l": ...}``."""
  if len(answers) != len(references) or not answers:
    raise ValueError(f"Need equally many answers and references (at least one), got {len(answers)} and "
                     f"{len(references)}.")
  pairs = list(zip(answers, references))
  return {"exact_match": sum(exact_match(a, r) for a, r in pairs) / len(pairs),
          "rouge_l": sum(rouge_l(a, r) for a, r in pairs) / len(pairs)}
