"""Same-process A/B of the low-rank path's formulation in jlora's LoRA train step (peer shape of ``--suite full``).

``python -m tools.bench.low_rank_ab [rounds] [--dora]`` compiles the step twice per layer form (``nn.scan`` and
unrolled): once with the N-D einsum low-rank path jlora used for every equation before 2026-12-02
(``jlora._einsum.nd_low_rank_einsum``, the "before" arm) and once with the library's current
``low_rank_einsum`` (2-D operands where it can), checks the two give the same adapters after one step, counts the compiled programs' layout ops
(``transpose`` and ``copy`` instructions of the optimised HLO), and times them in interleaved rounds.
``--dora`` runs the same A/B on DoRA adapters (``use_dora=True``).
"""

import collections
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora._linen_bindings
from jlora._einsum import low_rank_einsum, nd_low_rank_einsum
from tools.bench import _models
from tools.bench._suites import SUITES


def main(rounds: int, use_dora: bool = False) -> None:
  shape = SUITES["full"].peer_shape
  tx = _models.optimizer()
  compiled = {}
  for scan in (True, False):
    setup = _models.linen_setup(shape, scan=scan, use_dora=use_dora)
    for arm, fn in (("einsum", nd_low_rank_einsum), ("2d", low_rank_einsum)):
      jlora._linen_bindings.low_rank_einsum = fn  # the binding's module-level name, read at trace time
      args = (_models.copy_tree(setup.adapters), tx.init(setup.adapters), setup.params, setup.ids)
      step = jax.jit(_models.lora_train_step(setup.lora, tx)).lower(*args).compile()
      compiled[f"{'scan' if scan else 'unrolled'}_{arm}"] = (step, args)
  jlora._linen_bindings.low_rank_einsum = low_rank_einsum
  for name, (step, _) in compiled.items():
    ops = collections.Counter(re.findall(r"= \S+ (transpose|copy)\(", step.as_text()))
    print(f"{name}: {ops['transpose']} transposes, {ops['copy']} copies in the optimised HLO")
  after = {name: step(*args)[0] for name, (step, args) in compiled.items()}
  for form in ("scan", "unrolled"):
    diff = jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q))), after[f"{form}_einsum"], after[f"{form}_2d"])
    print(f"{form}: max |adapters after one step, einsum - 2d| = {max(jax.tree.leaves(diff)):.2e}")
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, (step, args) in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[name].append(time.perf_counter() - start)
  print(json.dumps({name: round(1e3 * float(np.median(t)), 1) for name, t in times.items()}), "(median ms)")
  for form in ("scan", "unrolled"):
    ratios = [n / o for n, o in zip(times[f"{form}_2d"], times[f"{form}_einsum"], strict=True)]
    print(f"{form}: 2d / einsum step time, median of {rounds} same-round ratios {np.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a != "--dora"]
  main(int(args[0]) if args else 12, use_dora="--dora" in sys.argv[1:])
