"""Command line: ``python -m tools.bench [--suite smoke|quick|full] [--only dora|bank|qlora] [--out results.json] [--profile DIR]``.

Prints the results table on stdout (progress goes to stderr) and writes the JSON report to ``--out``
(or prints it after the table when ``--out`` is omitted).
"""

import argparse
import shlex
import sys
from pathlib import Path

from tools.bench._report import format_table
from tools.bench._run import run_suite
from tools.bench._suites import SUITES


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
  parser.add_argument("--suite", choices=sorted(SUITES), default="quick", help="what to measure (default: quick)")
  parser.add_argument("--out", type=Path, help="write the JSON report here")
  parser.add_argument("--only", choices=["dora", "bank", "qlora"],
                      help="run one section alone (dora: DoRA vs LoRA, jlora and PEFT, on the suite's headline train "
                           "shape; bank: mixed-adapter batches, 16 adapters vs one, jlora and PEFT; qlora: the NF4 "
                           "base vs the bf16 one and qwix's QLoRA, with device peaks on an accelerator)")
  parser.add_argument("--profile", type=Path, metavar="DIR",
                      help="also write the largest train shape's optimised HLO and per-op times to DIR")
  args = parser.parse_args(argv)
  command = shlex.join(["python", "-m", "tools.bench", *(sys.argv[1:] if argv is None else argv)])
  report = run_suite(SUITES[args.suite], command=command, profile_dir=args.profile, only=args.only)
  print(format_table(report))
  if args.out is None:
    print(report.dumps())
  else:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.dumps() + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
