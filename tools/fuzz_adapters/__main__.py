"""``python -m tools.fuzz_adapters``: run the campaign, print the outcome table, exit 1 on any failure."""

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from tools.fuzz_adapters import _campaign, _subjects

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _subprocess_validate(subjects: _subjects.Subjects, directory: pathlib.Path) -> tuple[int, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  done = subprocess.run([sys.executable, "-m", "jlora", "validate", str(directory), "--base", str(subjects.base_dir)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return done.returncode, done.stderr


def subprocess_checks(subjects, results, count: int, seed: int, scratch: pathlib.Path) -> list[dict]:
  """Re-creates ``count`` mutations (half refused, half loaded where there are) and validates each in a real
  ``python -m jlora validate`` subprocess; its exit status must agree with the in-process outcome."""
  by_outcome = collections.defaultdict(list)
  for result in results:
    by_outcome["loaded" if result.outcome not in ("refused", "refused-other") else "refused"].append(result)
  chosen = by_outcome["loaded"][:count // 2]
  chosen += by_outcome["refused"][:count - len(chosen)]
  prepared = []
  for result in chosen:
    directory, _, mutation = _campaign.materialize(subjects, result.index, (result.path, result.kind, result.mode),
                                                   seed, scratch / "subprocess")
    assert mutation == result.mutation, (mutation, result.mutation)
    prepared.append((result, directory))
  checks = []
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = pool.map(lambda item: _subprocess_validate(subjects, item[1]), prepared)
    for (result, _), (status, stderr) in zip(prepared, runs):
      expected = 1 if result.outcome.startswith("refused") else 0
      ok = status == expected and (status == 0 or stderr.startswith("error: "))
      checks.append({"index": result.index, "mutation": result.mutation, "in_process": result.outcome,
                     "exit_status": status, "agrees": ok, "stderr": stderr.strip()[-300:]})
  return checks


def _print_table(title: str, table: dict[str, dict[str, int]]) -> None:
  outcomes = sorted({o for row in table.values() for o in row})
  print(f"\n{title}")
  if not table:
    return
  width = max(len(row) for row in table) + 2
  print(" " * width + "".join(f"{o:>18}" for o in outcomes) + f"{'all':>8}")
  for row, counts in sorted(table.items(), key=lambda item: (item[0] == "total", item[0])):
    print(f"{row:<{width}}" + "".join(f"{counts.get(o, 0):>18}" for o in outcomes) + f"{sum(counts.values()):>8}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.fuzz_adapters", description=__doc__)
  parser.add_argument("--mutations", type=int, default=1200, help="seeded mutations over the load paths")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--subprocesses", type=int, default=6, help="mutations re-checked in real CLI subprocesses")
  parser.add_argument("--no-span", action="store_true", help="skip flipping every bit of the __metadata__ span")
  parser.add_argument("--only", type=int, help="run only this mutation index and print its details")
  parser.add_argument("--json", help="write every result to this file")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs every damaged checkpoint it is shown

  started = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="jlora_fuzz_") as tmp:
    scratch = pathlib.Path(tmp)
    subjects = _subjects.build(scratch / "subjects")
    order = _campaign.plan(args.mutations, args.seed)
    indices = [args.only] if args.only is not None else range(len(order))
    results = []
    for done, index in enumerate(indices, 1):
      results.append(_campaign.run_one(subjects, index, order[index], args.seed, scratch))
      if done % 100 == 0:
        print(f"{done}/{len(indices)} mutations, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    campaign_seconds = time.perf_counter() - started
    span = [] if args.no_span or args.only is not None else _campaign.metadata_span_flips(subjects, scratch)
    span_seconds = time.perf_counter() - started - campaign_seconds
    checks = ([] if args.only is not None
              else subprocess_checks(subjects, results, args.subprocesses, args.seed, scratch))
  total_seconds = time.perf_counter() - started

  if args.only is not None:
    print(json.dumps(dataclasses.asdict(results[0]), indent=2))
  _print_table(f"{len(results)} seeded mutations (seed {args.seed}), {campaign_seconds:.1f} s",
               _campaign.summary(results))
  regions = collections.Counter(f"{r.kind}/{r.region_kind}" for r in results)
  print("\nmutations per region kind: " + ", ".join(f"{k} {v}" for k, v in sorted(regions.items())))
  if span:
    _print_table(f"every bit of the __metadata__ span flipped ({len(span)} flips), {span_seconds:.1f} s",
                 {"library/peft/structure": collections.Counter(r.outcome for r in span)})
  if checks:
    agree = sum(c["agrees"] for c in checks)
    print(f"\n{len(checks)} real `python -m jlora validate` subprocesses: {agree} agree with the in-process outcome")
    for check in checks:
      print(f"  #{check['index']} exit {check['exit_status']} ({check['in_process']}): {check['mutation']}")
  failures = [r for r in results + span if r.failed] + [c for c in checks if not c["agrees"]]
  print(f"\n{len(results) + len(span) + len(checks)} loads in {total_seconds:.1f} s; {len(failures)} failures")
  for failure in failures[:40]:
    print(f"  FAILED {failure}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results],
                                                   "span": [dataclasses.asdict(r) for r in span],
                                                   "subprocess": checks}, indent=1))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
