"""A seeded fuzz campaign over every adapter load path: ``python -m tools.fuzz_adapters --mutations 1200 --seed 0``.

Builds a tiny random Llama base and one LoRA adapter written both as a PEFT directory and as a jlora
directory, then loads thousands of mutated copies through ``jlora.peft.from_pretrained``,
``jlora.load_adapters`` and the CLI's ``validate`` (in process, plus a few real subprocesses), and
flips every bit of the safetensors ``__metadata__`` span. Each outcome must be a refusal with jlora's
error type or a load whose result is provably what it may be (see ``_campaign`` for the classes and
what "identical" means). Exit status 1 when any mutation failed.
"""

from tools.fuzz_adapters._campaign import (
  CELLS,
  FAILURES,
  Result,
  allowed,
  classify,
  materialize,
  metadata_span_flips,
  plan,
  run_one,
  summary,
)
from tools.fuzz_adapters._subjects import Subjects, build

__all__ = ["CELLS", "FAILURES", "Result", "Subjects", "allowed", "build", "classify", "materialize",
           "metadata_span_flips", "plan", "run_one", "summary"]
