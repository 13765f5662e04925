"""Regexes read from adapter files are untrusted input: refuse the shapes that backtrack exponentially.

PEFT configs (``target_modules``, ``rank_pattern``, ...) and jlora metadata (``LoraConfig.targets``)
carry regexes that are matched against every module name or parameter path. Python's ``re`` has no
timeout, so a pattern such as ``(a+)+$`` or ``(a|a)*$`` could hang the loader. Inside an unbounded
repeat only plain atoms (literals, classes, ``.``) are allowed: no nested repeats, alternations or
backreferences, and at most a few unbounded repeats overall.
"""

import re

try:
  from re import _parser as sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover
  import sre_parse  # type: ignore[no-redef]

from jlora._safety._errors import UnsafeAdapterError

MAX_LENGTH = 512
MAX_UNBOUNDED = 4
_REPEATS = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None))
_ATOMS = (sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.IN, sre_parse.ANY, sre_parse.CATEGORY)


def _walk(items, inside_repeat: bool, counts: dict) -> str | None:
  for op, value in items:
    if op in _REPEATS:
      _, high, body = value
      unbounded = high is sre_parse.MAXREPEAT or high > 64
      if unbounded:
        counts["unbounded"] += 1
      if inside_repeat and (unbounded or high > 1):
        return "a repeat inside a repeat"
      problem = _walk(body, inside_repeat or high > 1, counts)
      if problem:
        return problem
    elif op == sre_parse.SUBPATTERN:
      problem = _walk(value[-1], inside_repeat, counts)
      if problem:
        return problem
    elif op == sre_parse.BRANCH:
      if inside_repeat:
        return "an alternation inside a repeat"
      for branch in value[1]:
        problem = _walk(branch, inside_repeat, counts)
        if problem:
          return problem
    elif op in (sre_parse.GROUPREF, getattr(sre_parse, "GROUPREF_EXISTS", None)):
      return "a backreference"
    elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
      problem = _walk(value[1], inside_repeat, counts)
      if problem:
        return problem
    elif inside_repeat and op not in _ATOMS:
      return f"{op} inside a repeat"
  return None


def check_regex(pattern: object, where: str) -> str:
  """Returns ``pattern`` if it is a short regex without catastrophic-backtracking shapes; else raises."""
  if not isinstance(pattern, str):
    raise UnsafeAdapterError(f"{where}: {pattern!r} is not a regex string.")
  if len(pattern) > MAX_LENGTH:
    raise UnsafeAdapterError(f"{where}: a {len(pattern)}-character regex, over the {MAX_LENGTH}-character limit.")
  try:
    parsed = sre_parse.parse(pattern)
  except (re.error, RecursionError, OverflowError) as e:
    raise UnsafeAdapterError(f"{where}: {pattern!r} is not a valid regex: {e}") from None
  counts = {"unbounded": 0}
  problem = _walk(list(parsed), False, counts)
  if problem is None and counts["unbounded"] > MAX_UNBOUNDED:
    problem = f"{counts['unbounded']} unbounded repeats (at most {MAX_UNBOUNDED})"
  if problem:
    raise UnsafeAdapterError(f"{where}: regex {pattern!r} has {problem}, which can backtrack catastrophically; "
                             "jlora refuses such patterns from adapter files.")
  return pattern
