"""Runs a suite: every measurement, side by side in one process, into one :class:`Report`.

Figure names: ``<figure>@<shape label>`` per train shape (``lora_full_step_ratio@d2048_t512``), and
the headline names without a suffix (``lora_full_step_ratio`` is the suite's largest train shape).
Ratios are always jlora-or-LoRA over the reference, so lower is better and every target is an upper
bound.
"""

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax

import jlora
from tools.bench import _machine
from tools.bench._bank import bank_section
from tools.bench._inference import decode_contenders, forward_contenders
from tools.bench._models import (
  LORA_RANK,
  Shape,
  copy_tree,
  full_train_step,
  linen_setup,
  lora_config,
  lora_train_step,
  optimizer,
)
from tools.bench._peers import (
  flax_nnx_lora,
  jlora_linen_one_adapter,
  jlora_nnx,
  lorax_subprocess,
  peft_torch,
  qwix_lora,
)
from tools.bench._profile import op_times, write_profile
from tools.bench._qlora import qlora_section
from tools.bench._report import Report
from tools.bench._suites import Suite
from tools.bench._timing import CompiledStep, Stepper, Timing, paired_ratio, round_ratios, time_interleaved
from tools.bench._workbench import Workbench

STEP_TARGET = 0.72  # LoRA/full step time, for the d_model=2048, T=512 decoder
STEP_FLOP_GAP_TARGET = 0.03  # |step-time ratio - FLOP ratio|, same decoder
MEMORY_TARGET = 0.35  # LoRA/full peak memory where parameters dominate
MERGED_TARGET = 1.02  # merged forward / base forward
PEER_TARGET = 1.0  # jlora / peer
PEFT_TARGET = 0.95  # jlora's default LoRA step / PEFT's on torch, same machine
JAX_PEER_TARGET = 0.90  # the fastest jlora form / the fastest JAX peer (flax nnx.LoRALinear, qwix, lorax)
JAX_PEERS = ("flax_nnx_lora", "qwix_lora", "lorax")
DORA_TARGET = 1.15  # DoRA/LoRA step time, for the d_model=2048, T=512 decoder
_MIB = 2**20


def _log(message: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _targets_apply(shape: Shape) -> bool:
  return shape.hidden >= 2048 and shape.seq >= 512


def _spread(ours: Timing, theirs: Timing) -> str:
  ratios = round_ratios(ours, theirs)
  return f"per-round ratios {min(ratios):.3f}..{max(ratios):.3f}"


def _timed(timing: Timing) -> str:
  return (f"median of {timing.rounds} interleaved rounds {timing.median_s * 1e3:.1f} ms (min {timing.min_s * 1e3:.1f}, "
          f"CPU time {timing.cpu_median_s * 1e3:.1f})")


def _train_steps(report: Report, suite: Suite, bench: Workbench, shape: Shape, profile_dir: Path | None) -> None:
  """LoRA vs full fine-tuning on one shape: step time, FLOPs, memory, compile time (scan on and off)."""
  label, tx = shape.label, bench.tx
  _log(f"train {label}: {shape.describe()}")
  full, lora = (bench.train_step(shape, scan=True, arm=arm) for arm in ("full", "lora"))
  _log(f"train {label}: compiled with scan (full {full.total_compile_s:.1f} s, LoRA {lora.total_compile_s:.1f} s)")
  full_flat, lora_flat = (bench.train_step(shape, scan=False, arm=arm) for arm in ("full", "lora"))
  _log(f"train {label}: compiled unrolled (full {full_flat.total_compile_s:.1f} s, LoRA "
       f"{lora_flat.total_compile_s:.1f} s); timing")
  setup = bench.concrete(shape, scan=True)
  steppers = {"full": Stepper(full.executable, (copy_tree(setup.params), tx.init(setup.params)), setup.ids),
              "lora": Stepper(lora.executable, (copy_tree(setup.adapters), tx.init(setup.adapters)), setup.params,
                              setup.ids)}
  times = time_interleaved(steppers, warmup=suite.warmup, reps=suite.reps, budget_s=suite.budget_s)
  if profile_dir is not None:
    for name, compiled in (("full", full), ("lora", lora)):
      text = compiled.executable.as_text()
      write_profile(profile_dir, f"{name}_step_{label}", text, op_times(steppers[name], text))
  del steppers

  step_ratio = paired_ratio(times["lora"], times["full"])
  cpu_ratio = paired_ratio(times["lora"], times["full"], cpu=True)
  flop_ratio = lora_flat.flops / full_flat.flops
  scan_flop_ratio = lora.flops / full.flops
  headline = shape == suite.train_shapes[-1]
  applies = _targets_apply(shape)
  not_applicable = "" if applies else "; the target is stated for d_model=2048, T=512 (full suite), so none here"
  step_detail = (f"median over rounds of LoRA/full in the same round ({_spread(times['lora'], times['full'])}); LoRA "
                 f"{_timed(times['lora'])}, full {_timed(times['full'])}; "
                 f"{shape.describe()}; nn.scan layers, AdamW, donated state{not_applicable}")
  flop_detail = (f"XLA cost_analysis of the same steps with layers unrolled (every layer counted): LoRA "
                 f"{lora_flat.flops / 1e9:.1f} / full {full_flat.flops / 1e9:.1f} GFLOP; with nn.scan XLA counts the "
                 f"layer body once: {lora.flops / 1e9:.1f} / {full.flops / 1e9:.1f} GFLOP = {scan_flop_ratio:.3f}; "
                 f"XLA's bytes-accessed ratio (unrolled) {lora_flat.bytes_accessed / full_flat.bytes_accessed:.3f}")
  gap = abs(step_ratio - flop_ratio)
  memory_ratio = lora.memory.peak_bytes / full.memory.peak_bytes
  names = [f"@{label}"] + ([""] if headline else [])
  for suffix in names:
    report.add(f"lora_full_step_ratio{suffix}", step_ratio, STEP_TARGET if applies else None, step_detail)
    report.add(f"lora_full_flop_ratio{suffix}", flop_ratio, None, flop_detail)
    report.add(f"lora_step_flop_ratio_gap{suffix}", gap, STEP_FLOP_GAP_TARGET,
               f"|{step_ratio:.3f} - {flop_ratio:.3f}|: how far LoRA's step-time saving is from its FLOP saving "
               f"({'LoRA faster' if step_ratio < flop_ratio else 'LoRA slower'} than its FLOPs predict)")
  report.add(f"lora_full_step_cpu_ratio@{label}", cpu_ratio, None,
             "the same steps' process CPU time (all threads), median per step: less sensitive to other processes "
             "competing for the cores than wall time")
  report.add(f"lora_step_ms@{label}", times["lora"].median_s * 1e3, None, _timed(times["lora"]))
  report.add(f"full_step_ms@{label}", times["full"].median_s * 1e3, None, _timed(times["full"]))
  for name, flat_step in (("lora", lora_flat), ("full", full_flat)):
    report.add(f"{name}_step_gflop_per_s@{label}", flat_step.flops / 1e9 / times[name].median_s, None,
               "unrolled-step XLA FLOPs / median step time: the achieved compute rate")
  report.add(f"lora_full_memory_ratio@{label}", memory_ratio, None,
             f"compiled memory_analysis with scan, LoRA {lora.memory.describe()}; full {full.memory.describe()}")
  _compile_figures(report, label, {"scan": (full, lora), "unrolled": (full_flat, lora_flat)}, headline)


def _dora(report: Report, suite: Suite, bench: Workbench, shape: Shape) -> None:
  """DoRA vs LoRA train steps on one shape (jlora's, and PEFT's on torch), timed in the same interleaved rounds.

  jlora's DoRA never forms ``W + s B A``: its column norm comes from ``||W||²``, a ``W^T A`` product and the
  ``r x r`` Gram, all detached; the step-time and memory ratios show what that costs over LoRA.
  """
  label, tx = shape.label, bench.tx
  _log(f"dora {label}: {shape.describe()}")
  lora, dora = (bench.train_step(shape, scan=True, arm=arm) for arm in ("lora", "dora"))
  setup = bench.concrete(shape, scan=True)
  dora_lora = jlora.Lora(setup.model, lora_config(use_dora=True))
  dora_adapters = dora_lora.init(jax.random.key(2), setup.params, setup.ids)
  contenders: dict[str, Callable] = {
      "jlora_lora": Stepper(lora.executable, (copy_tree(setup.adapters), tx.init(setup.adapters)), setup.params,
                            setup.ids),
      "jlora_dora": Stepper(dora.executable, (dora_adapters, tx.init(dora_adapters)), setup.params, setup.ids)}
  details = {"jlora_lora": "jlora.Lora", "jlora_dora": "jlora.Lora with use_dora=True"}
  peft_reason = ""
  for name, use_dora in (("peft_lora", False), ("peft_dora", True)):
    peft = peft_torch(shape, _machine.usable_cores(), use_dora=use_dora)
    if isinstance(peft, str):
      peft_reason = peft
      break
    contenders[name], details[name] = peft.run, peft.detail
  if peft_reason:
    contenders.pop("peft_lora", None)
  _log(f"dora {label}: timing {', '.join(contenders)}")
  times = time_interleaved(contenders, warmup=suite.warmup, reps=suite.reps, budget_s=suite.budget_s)
  for name, timing in times.items():
    report.add(f"{name}_step_ms@{label}", timing.median_s * 1e3, None, f"{details[name]}; {_timed(timing)}")
  applies = _targets_apply(shape)
  not_applicable = "" if applies else "; the target is stated for d_model=2048, T=512 (full suite), so none here"
  ratio = paired_ratio(times["jlora_dora"], times["jlora_lora"])
  report.add("dora_lora_step_ratio", ratio, DORA_TARGET if applies else None,
             f"jlora DoRA/LoRA, median of same-round ratios ({_spread(times['jlora_dora'], times['jlora_lora'])}; "
             f"CPU-time ratio {paired_ratio(times['jlora_dora'], times['jlora_lora'], cpu=True):.3f}); rank "
             f"{LORA_RANK} on the seven projections, nn.scan layers, AdamW; {shape.describe()}{not_applicable}")
  report.add("dora_lora_flop_ratio", dora.flops / lora.flops, None,
             f"XLA cost_analysis, DoRA {dora.flops / 1e9:.2f} / LoRA {lora.flops / 1e9:.2f} GFLOP (nn.scan: the layer "
             "body counted once in both)")
  report.add("dora_lora_memory_ratio", dora.memory.peak_bytes / lora.memory.peak_bytes, None,
             f"compiled memory_analysis with scan, DoRA {dora.memory.describe()}; LoRA {lora.memory.describe()}")
  report.add("dora_step_peak_mib", dora.memory.peak_bytes / _MIB, None,
             f"compiled memory_analysis (argument + output - alias + temp), frozen base included; {shape.describe()}")
  if peft_reason:
    report.add("peft_dora_lora_step_ratio", None, None, peft_reason)
  else:
    report.add("peft_dora_lora_step_ratio", paired_ratio(times["peft_dora"], times["peft_lora"]), None,
               f"PEFT DoRA/LoRA on torch, the same shapes and recipe, median of same-round ratios "
               f"({_spread(times['peft_dora'], times['peft_lora'])}); PEFT forms W + s B A and its norm every step")
    report.add("jlora_peft_dora_step_ratio", paired_ratio(times["jlora_dora"], times["peft_dora"]), None,
               f"jlora DoRA / PEFT DoRA ({_spread(times['jlora_dora'], times['peft_dora'])})")
  del contenders


def _compile_figures(report: Report, label: str, pairs: dict[str, tuple[CompiledStep, CompiledStep]],
                     headline: bool) -> None:
  for layers, (full, lora) in pairs.items():
    detail = (f"trace+lower+compile, layers {layers}: LoRA {lora.trace_lower_s:.2f}+{lora.compile_s:.2f} s / full "
              f"{full.trace_lower_s:.2f}+{full.compile_s:.2f} s (one cold compile each)")
    ratio = lora.total_compile_s / full.total_compile_s
    for suffix in [f"@{label}"] + ([""] if headline else []):
      report.add(f"lora_full_compile_ratio_{layers}{suffix}", ratio, None, detail)
    report.add(f"lora_compile_s_{layers}@{label}", lora.total_compile_s, None, detail)
    report.add(f"full_compile_s_{layers}@{label}", full.total_compile_s, None, detail)


def _memory(report: Report, bench: Workbench, shape: Shape) -> None:
  """LoRA/full peak memory of a train step where parameters dominate (compiled, not run)."""
  _log(f"memory {shape.label}: {shape.describe()}")
  full, lora = (bench.train_step(shape, scan=True, arm=arm) for arm in ("full", "lora"))
  setup = bench.abstract(shape, scan=True)
  param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(setup.params))
  ratio = lora.memory.peak_bytes / full.memory.peak_bytes
  how = ("XLA's compiled memory plan (memory_analysis: argument + output - alias + temp bytes, frozen base "
         "included as LoRA's argument)")
  report.add("lora_full_memory_ratio", ratio, MEMORY_TARGET,
             f"{how}; {shape.describe()}; base params {param_bytes / _MIB:.0f} MiB; LoRA {lora.memory.describe()}; "
             f"full {full.memory.describe()}")
  report.add("lora_step_peak_mib", lora.memory.peak_bytes / _MIB, None, f"{how}; {shape.describe()}")
  report.add("full_step_peak_mib", full.memory.peak_bytes / _MIB, None, f"{how}; {shape.describe()}")
  if jax.devices()[0].platform != "cpu":
    report.add("lora_full_device_memory_ratio", *_device_peak_ratio(shape))


def _device_peak_ratio(shape: Shape) -> tuple[float | None, float | None, str]:
  """On an accelerator: LoRA step's then full step's peak ``bytes_in_use``, from the device's own counters.

  The device's peak counter only grows, so the LoRA step runs first and its buffers are freed before
  the full step; each peak is measured above the bytes in use before that step's state was created.
  """
  dev = jax.devices()[0]
  if not (dev.memory_stats() or {}).get("peak_bytes_in_use"):
    return None, MEMORY_TARGET, f"{dev.platform} reports no peak_bytes_in_use"
  tx = optimizer()
  peaks = {}
  for name in ("lora", "full"):
    before = dev.memory_stats()["bytes_in_use"]
    setup = linen_setup(shape, scan=True)
    if name == "lora":
      stepper = Stepper(jax.jit(lora_train_step(setup.lora, tx), donate_argnums=(0, 1)),
                        (setup.adapters, tx.init(setup.adapters)), setup.params, setup.ids)
    else:
      stepper = Stepper(jax.jit(full_train_step(setup.model, tx), donate_argnums=(0, 1)),
                        (setup.params, tx.init(setup.params)), setup.ids)
    jax.block_until_ready(stepper())
    peaks[name] = dev.memory_stats()["peak_bytes_in_use"] - before
    del stepper, setup
  detail = (f"device memory_stats peak_bytes_in_use: LoRA {peaks['lora'] / _MIB:.0f} MiB / full "
            f"{peaks['full'] / _MIB:.0f} MiB; {shape.describe()}")
  return peaks["lora"] / peaks["full"], MEMORY_TARGET, detail


def _peers(report: Report, suite: Suite, bench: Workbench) -> None:
  """jlora vs flax nnx.LoRALinear, qwix, lorax and PEFT on one shape, all timed in the same interleaved rounds."""
  shape, tx = suite.peer_shape, bench.tx
  _log(f"peers {shape.label}: {shape.describe()}")
  contenders: dict[str, Callable] = {}
  details: dict[str, str] = {}
  reasons: dict[str, str] = {}
  for scan in (True, False):
    setup = bench.concrete(shape, scan=scan)
    compiled = bench.train_step(shape, scan=scan, arm="lora")
    name = f"jlora_linen_{'scan' if scan else 'unrolled'}"
    contenders[name] = Stepper(compiled.executable, (copy_tree(setup.adapters), tx.init(setup.adapters)),
                               setup.params, setup.ids)
    details[name] = (f"jlora.Lora on jlora.models.LlamaForCausalLM, layers {'nn.scan' if scan else 'unrolled'} "
                     f"({shape.describe()})")
  ids = shape.token_batch(jax.random.key(0))
  for name, build in (("jlora_nnx", jlora_nnx), ("flax_nnx_lora", flax_nnx_lora)):
    contender = build(shape, ids)
    contenders[name], details[name] = contender.run, contender.detail
  one = jlora_linen_one_adapter(bench.concrete(shape, scan=False))
  contenders["jlora_linen_one_adapter"], details["jlora_linen_one_adapter"] = one.run, one.detail
  qwix = qwix_lora(bench.concrete(shape, scan=False))
  if isinstance(qwix, str):
    reasons["qwix_lora"] = qwix
  else:
    contenders["qwix_lora"], details["qwix_lora"] = qwix.run, qwix.detail
  lorax = lorax_subprocess(shape)
  worker = None
  if isinstance(lorax, str):
    reasons["lorax"] = lorax
  else:
    (contender, worker) = lorax
    contenders["lorax"], details["lorax"] = contender.run, contender.detail
  for name, one_adapter in (("peft_torch", False), ("peft_torch_one_adapter", True)):
    peft = peft_torch(shape, _machine.usable_cores(), one_adapter=one_adapter)
    if isinstance(peft, str):
      reasons["peft_torch"] = peft
      contenders.pop("peft_torch", None)
      break
    contenders[name], details[name] = peft.run, peft.detail
  _log(f"peers {shape.label}: timing {', '.join(contenders)}")
  try:
    times = time_interleaved(contenders, warmup=suite.warmup, reps=suite.reps, budget_s=suite.budget_s)
  finally:
    if worker is not None:
      worker.close()
  for name, timing in times.items():
    report.add(f"{name}_step_ms", timing.median_s * 1e3, None, f"{details[name]}; {_timed(timing)}")
  for name, reason in reasons.items():
    report.add(f"{name}_step_ms", None, None, reason)

  def ratio(name: str, ours: str, theirs: str, target: float | None, why: str) -> None:
    cpu_ratio = paired_ratio(times[ours], times[theirs], cpu=True)
    report.add(name, paired_ratio(times[ours], times[theirs]), target,
               f"{ours} {times[ours].median_s * 1e3:.1f} ms / {theirs} {times[theirs].median_s * 1e3:.1f} ms, "
               f"median of same-round ratios ({_spread(times[ours], times[theirs])}; CPU-time ratio {cpu_ratio:.3f}); "
               f"{why}")

  ratio("jlora_nnx_step_ratio", "jlora_nnx", "flax_nnx_lora", PEER_TARGET,
        "the same NnxLlama module code and functional train step, differing only in the projections' LoRA "
        "(jlora.nnx.apply_lora on nnx.Linear vs flax nnx.LoRALinear)")
  ratio("jlora_linen_nnx_step_ratio", "jlora_linen_unrolled", "flax_nnx_lora", None,
        "jlora on the linen LlamaForCausalLM vs flax nnx.LoRALinear on NnxLlama: same maths, both unrolled")
  if "qwix_lora" in times:
    ratio("jlora_qwix_step_ratio", "jlora_linen_unrolled", "qwix_lora", PEER_TARGET,
          "jlora vs qwix's LoRA on the same unrolled linen LlamaForCausalLM")
  if "lorax" in times:
    ratio("jlora_lorax_step_ratio", "jlora_linen_unrolled", "lorax", PEER_TARGET,
          "jlora (unrolled linen) vs lorax on a plain-JAX Llama of the same shape in a subprocess (jax 0.4.35)")
  ours = min(("jlora_linen_scan", "jlora_linen_unrolled", "jlora_nnx"), key=lambda n: times[n].median_s)
  jax_peer = min((n for n in JAX_PEERS if n in times), key=lambda n: times[n].median_s)
  ratio("jlora_best_jax_peer_step_ratio", ours, jax_peer, JAX_PEER_TARGET,
        f"the fastest jlora form vs the fastest JAX peer (of {', '.join(n for n in JAX_PEERS if n in times)})")
  if "peft_torch" not in times:
    report.add("jlora_peft_step_ratio", None, PEFT_TARGET, reasons["peft_torch"])
    report.add("jlora_best_peer_step_ratio", None, PEER_TARGET, reasons["peft_torch"])
    return
  ratio("jlora_peft_step_ratio", "jlora_linen_scan", "peft_torch", PEFT_TARGET,
        "jlora's default (nn.scan LlamaForCausalLM) vs PEFT on transformers' LlamaForCausalLM, same shapes and recipe")
  theirs = min((*(n for n in JAX_PEERS if n in times), "peft_torch"), key=lambda n: times[n].median_s)
  ratio("jlora_best_peer_step_ratio", ours, theirs, PEER_TARGET, "the fastest jlora form vs the fastest peer")
  _peft_decomposition(report, times)


def _peft_decomposition(report: Report, times: dict[str, Timing]) -> None:
  """Splits jlora-vs-PEFT into the frozen base's share and the low-rank paths' share (same rounds).

  A one-adapter step is the base's forward and input-gradient backward; the all-projections step
  minus it (median of same-round differences) is what the 28 low-rank paths cost.
  """
  report.add("jlora_peft_one_adapter_step_ratio",
             paired_ratio(times["jlora_linen_one_adapter"], times["peft_torch_one_adapter"]), None,
             f"one adapter (first layer's q_proj) each, layers unrolled: the frozen base's forward + input-gradient "
             f"backward in XLA vs torch, {times['jlora_linen_one_adapter'].median_s * 1e3:.1f} / "
             f"{times['peft_torch_one_adapter'].median_s * 1e3:.1f} ms "
             f"({_spread(times['jlora_linen_one_adapter'], times['peft_torch_one_adapter'])})")
  paths = {}
  for ours, one in (("jlora_linen_unrolled", "jlora_linen_one_adapter"), ("peft_torch", "peft_torch_one_adapter")):
    paths[ours] = statistics.median(a - b for a, b in zip(times[ours].samples_s, times[one].samples_s, strict=True))
  for name, key in (("jlora_lora_paths_ms", "jlora_linen_unrolled"), ("peft_lora_paths_ms", "peft_torch")):
    report.add(name, paths[key] * 1e3, None,
               f"{key} step minus its one-adapter step, median of same-round differences: the time of all the "
               "low-rank paths (forward, backward, optimizer) beyond the frozen base's")


def _inference(report: Report, suite: Suite, bench: Workbench) -> None:
  """Forward passes (base, unmerged LoRA, merged) and KV-cache decoding with and without adapters."""
  shape = suite.inference_shape
  _log(f"inference {shape.label}: {shape.describe()}")
  setup = bench.concrete(shape, scan=True)
  runs, compiled = forward_contenders(setup)
  times = time_interleaved(runs, warmup=suite.warmup, reps=suite.reps, budget_s=suite.budget_s)
  base = times["base"].median_s
  flop_ratio = compiled["unmerged"].flops / compiled["base"].flops
  for name in ("base", "unmerged", "merged"):
    report.add(f"{name}_forward_ms", times[name].median_s * 1e3, None,
               f"{shape.describe()}; {_timed(times[name])}")
  cpu = {name: paired_ratio(times[name], times["base"], cpu=True) for name in ("unmerged", "merged")}
  report.add("unmerged_base_forward_ratio", paired_ratio(times["unmerged"], times["base"]), None,
             f"lora.apply(params, adapters, ids) / model.apply(params, ids), {times['unmerged'].median_s * 1e3:.1f} / "
             f"{base * 1e3:.1f} ms ({_spread(times['unmerged'], times['base'])}; CPU-time ratio "
             f"{cpu['unmerged']:.3f}); XLA FLOP ratio {flop_ratio:.4f} (scan body once in both)")
  aa = round_ratios(times["base_again"], times["base"])
  report.add("base_base_forward_ratio", paired_ratio(times["base_again"], times["base"]), None,
             f"A/A: the same base program on the same params timed as two contenders, per-round ratios "
             f"{min(aa):.3f}..{max(aa):.3f}: the timing noise of this run, against which merged/base is read")
  report.add("merged_base_forward_ratio", paired_ratio(times["merged"], times["base"]), MERGED_TARGET,
             f"the base program on lora.merge(params, adapters) / on params, {times['merged'].median_s * 1e3:.1f} / "
             f"{base * 1e3:.1f} ms ({_spread(times['merged'], times['base'])}; CPU-time ratio {cpu['merged']:.3f}): "
             "merged params are plain params, so any difference is noise")
  del runs, compiled

  batch, new = suite.decode_batch, suite.decode_new_tokens
  _log(f"decode {shape.label}: batch {batch}, prompt {suite.decode_prompt}, {new} new tokens")
  prompt = jax.random.randint(jax.random.key(3), (batch, suite.decode_prompt), 0, shape.vocab)
  long, short = decode_contenders(setup, prompt, new), decode_contenders(setup, prompt, 1)
  runs = {f"{name}_{n}": fn for n, group in ((new, long), (1, short)) for name, fn in group.items()}
  times = time_interleaved(runs, warmup=max(1, suite.warmup), reps=suite.reps,
                           budget_s=suite.budget_s)
  rates: dict[str, float | None] = {}
  for name in ("base", "lora"):
    long_s, short_s = times[f"{name}_{new}"].median_s, times[f"{name}_1"].median_s
    adapted = " with apply_fn=lora.apply_fn() on lora.inject(params, adapters)" if name == "lora" else ""
    how = (f"jlora.models.generate{adapted}, greedy, batch {batch}, prompt {suite.decode_prompt}: "
           f"batch*({new}-1) tokens / (time({new} new) {long_s * 1e3:.1f} ms - time(1 new) {short_s * 1e3:.1f} ms), "
           f"so prefill is excluded; {shape.describe()}")
    rates[name] = batch * (new - 1) / (long_s - short_s) if long_s > short_s else None
    report.add(f"decode_tokens_per_s_{name}", rates[name], None,
               how if rates[name] else f"not measurable: decoding took no longer than the prefill alone, timing noise "
                                       f"exceeds the decode time at this size; {how}")
  both = rates["base"] and rates["lora"]
  report.add("decode_lora_base_token_time_ratio", rates["base"] / rates["lora"] if both else None, None,
             "time per decoded token with unmerged adapters / without" if both else "a decode rate is missing")


def run_suite(suite: Suite, *, command: str, profile_dir: Path | None = None, only: str | None = None) -> Report:
  """Runs every measurement of ``suite`` and returns the report (machine, versions, load, figures).

  ``only="dora"`` runs the DoRA section alone, on the suite's headline train shape; ``only="bank"`` the
  mixed-adapter batches (``tools.bench._bank``); ``only="qlora"`` the QLoRA figures (``tools.bench._qlora``).
  """
  report = Report(
      suite=suite.name,
      command=command,
      date=_machine.now_utc(),
      device=_machine.device(),
      machine={"cpu_model": _machine.cpu_model(), "usable_cores": _machine.usable_cores(),
               "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend()},
      versions=_machine.versions(),
  )
  start = time.perf_counter()
  bench = Workbench()
  later = {suite.memory_shape, suite.peer_shape, suite.inference_shape}
  with _machine.LoadSampler() as load:
    if only in ("dora", "bank", "qlora"):
      if only == "dora":
        _dora(report, suite, bench, suite.train_shapes[-1])
      elif only == "qlora":
        qlora_section(report, suite, _log, alone=True)
      else:
        bank_section(report, suite, _machine.usable_cores(), _log)
      report.machine["load_average_1min"] = load.summary()
      report.machine["wall_s"] = round(time.perf_counter() - start, 1)
      return report
    if jax.devices()[0].platform != "cpu":
      _memory(report, bench, suite.memory_shape)  # first, while the device's peak-memory counter is fresh
    for shape in suite.train_shapes:
      _train_steps(report, suite, bench, shape, profile_dir if shape == suite.train_shapes[-1] else None)
      if shape == suite.train_shapes[-1]:
        _dora(report, suite, bench, shape)
      if shape not in later:
        bench.release(shape)
    if jax.devices()[0].platform == "cpu":
      _memory(report, bench, suite.memory_shape)
    _peers(report, suite, bench)
    _inference(report, suite, bench)
    qlora_section(report, suite, _log)
    bank_section(report, suite, _machine.usable_cores(), _log)
  report.machine["load_average_1min"] = load.summary()
  report.machine["wall_s"] = round(time.perf_counter() - start, 1)
  return report
