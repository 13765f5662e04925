"""The README's main command (tools.quickstart), shortened: LoRA learns and the merge is exact."""

from tools import quickstart


def test_quickstart_learns_and_merges():
  result = quickstart.main(steps=60)
  assert result["after"] < result["before"] - 1.0
  assert result["merge_diff"] < 1e-4
  assert 0 < result["trainable"] < result["total"] / 5
