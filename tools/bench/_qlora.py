"""QLoRA: what a 4-bit frozen base saves and costs, against the bf16-base LoRA step and against qwix's QLoRA.

The model is the benchmark's ``LlamaForCausalLM`` in bfloat16 (params and compute), LoRA the benchmark's recipe
(rank 16 on the seven projections, AdamW). Four train steps (two without qwix), each compiled from abstract
arguments and timed in the same interleaved rounds:

* ``lora_bf16``: LoRA over the bf16 base;
* ``qlora``: the same ``jlora.Lora`` over ``jlora.quant.quantize(params, projections)``: NF4 in blocks of 64 with
  double quantization, each kernel dequantized inside its own module's call (under ``nn.scan`` one layer at a time,
  again in the backward pass); the embedding and the LM head stay bf16, as QLoRA leaves them;
* ``qwix_qlora``: qwix's ``LoraProvider`` with ``LoraRule(weight_qtype="nf4", tile_size=64)`` on the same model
  and projections (``tools.bench._qwix``);
* ``qlora_bf16a``: jlora's QLoRA with bfloat16 adapters, qwix's choice (its adapters take the dtype of the weight's
  scale), so that jlora vs qwix compares like with like; jlora's default (and PEFT's) keeps adapters in float32.

Figures: bytes per quantized parameter counted on the arrays and in each compiled step's argument bytes (all its
arguments less the adapters, optimizer state, token ids and unquantized params); peak memory over the bf16 LoRA
step's (XLA's memory_analysis, and on an accelerator the device's own peak counter with ``--only qlora``), and
the same at the full depth of the model whose width the d2048 shape has (TinyLlama-1.1B: 22 layers), where the
projections, not the bf16 embedding and LM head, dominate the base; step times and their ratios.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import models, quant
from tools.bench import _qwix
from tools.bench._models import PROJECTIONS, Shape, copy_tree, lora_config, lora_train_step, optimizer
from tools.bench._report import Report
from tools.bench._suites import Suite
from tools.bench._timing import CompiledStep, Stepper, compile_step, paired_ratio, round_ratios, time_interleaved

BYTES_PER_PARAM_TARGET = 0.52  # NF4 with double quantization: 4.127 bits
MEMORY_TARGET = 0.45  # QLoRA / bf16-base LoRA peak memory, d_model=2048, 4 layers
QUANTIZED = rf".*/({'|'.join(PROJECTIONS)})/kernel"  # the seven projections, as LoRA targets them
FULL_DEPTH = 22  # TinyLlama-1.1B's decoder layers: the d2048 shape has its width, vocabulary and heads
_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class QloraSetup:
  """The bf16 model of a shape with its params, their NF4 form, a traced ``jlora.Lora`` and fresh adapters
  (float32, the recipe's; ``lora_bf16a`` / ``adapters_bf16a``: the same in bfloat16, as qwix keeps them)."""

  model: models.LlamaForCausalLM
  params: Any
  qparams: Any
  lora: jlora.Lora
  adapters: Any
  lora_bf16a: jlora.Lora
  adapters_bf16a: Any
  ids: jax.Array


def qlora_setup(shape: Shape, *, abstract: bool) -> QloraSetup:
  """The bf16 ``LlamaForCausalLM`` of ``shape`` (random init), quantized to NF4 (abstract: shapes only)."""
  config = dataclasses.replace(shape.llama_config(scan=True), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = models.LlamaForCausalLM(config)
  keys = jax.random.split(jax.random.key(0), 3)
  ids = shape.token_batch(keys[0])
  init = jax.jit(lambda key: model.init(key, ids)["params"])
  params = jax.eval_shape(init, keys[1]) if abstract else init(keys[1])
  qparams = jax.eval_shape(lambda p: quant.quantize(p, QUANTIZED), params) if abstract else quant.quantize(
      params, QUANTIZED)
  lora = jlora.Lora(model, lora_config())
  lora_bf16a = jlora.Lora(model, dataclasses.replace(lora_config(), dtype=jnp.bfloat16))
  adapters, adapters_bf16a = (
      jax.eval_shape(one.init, keys[2], params, ids) if abstract else one.init(keys[2], params, ids)
      for one in (lora, lora_bf16a))
  return QloraSetup(model, params, qparams, lora, adapters, lora_bf16a, adapters_bf16a, ids)


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _argument_bytes_per_param(step: CompiledStep, other_bytes: int, quantized_params: int) -> float:
  """The compiled step's argument bytes less every argument that is not a quantized kernel, per quantized param."""
  return (step.memory.argument_bytes - other_bytes) / quantized_params


@dataclasses.dataclass(frozen=True)
class _Compiled:
  lora: CompiledStep
  qlora: CompiledStep
  qlora_bf16a: CompiledStep | None
  qwix: CompiledStep | None
  qwix_setup: Any


def _compile(setup: QloraSetup, tx, *, peers: bool = True) -> _Compiled:
  """The bf16 LoRA and QLoRA steps; with ``peers`` (and qwix installed) also qwix's and jlora's bf16-adapter one."""
  opt_state = jax.eval_shape(tx.init, setup.adapters)
  step = lora_train_step(setup.lora, tx)
  lora = compile_step(step, setup.adapters, opt_state, setup.params, setup.ids, donate_argnums=(0, 1))
  qlora = compile_step(lora_train_step(setup.lora, tx), setup.adapters, opt_state, setup.qparams, setup.ids,
                       donate_argnums=(0, 1))
  qlora_bf16a = qwix = qwix_setup = None
  if peers and _qwix.available():
    qlora_bf16a = compile_step(lora_train_step(setup.lora_bf16a, tx), setup.adapters_bf16a,
                               jax.eval_shape(tx.init, setup.adapters_bf16a), setup.qparams, setup.ids,
                               donate_argnums=(0, 1))
    qwix_setup = _qwix.qwix_setup(setup.model, setup.ids, abstract=True)
    qwix = compile_step(_qwix.qwix_train_step(qwix_setup, tx), qwix_setup.adapters,
                        jax.eval_shape(tx.init, qwix_setup.adapters), qwix_setup.frozen, setup.ids,
                        donate_argnums=(0, 1))
  return _Compiled(lora, qlora, qlora_bf16a, qwix, qwix_setup)


def _memory_figures(report: Report, shape: Shape, setup: QloraSetup, compiled: _Compiled, tx, *, headline: bool,
                    suffix: str) -> None:
  footprint = quant.footprint(setup.qparams)
  opt_bytes = _nbytes(jax.eval_shape(tx.init, setup.adapters))
  other = _nbytes(setup.adapters) + opt_bytes + _nbytes(setup.ids) + footprint.other_bytes
  how = "XLA's compiled memory plan (memory_analysis: argument + output - alias + temp), frozen base included"
  target = BYTES_PER_PARAM_TARGET if headline else None
  if headline:
    report.add("qlora_base_bytes_per_param", footprint.bytes_per_param, target,
               f"jlora.quant.footprint of the NF4 base: {footprint.quantized_bytes:,} bytes of codes and statistics "
               f"for {footprint.quantized_params:,} projection weights (blocks of 64, 8-bit absmax, a float32 scale "
               f"per 256 blocks); {shape.describe()}")
  report.add(f"qlora_step_base_bytes_per_param{suffix}",
             _argument_bytes_per_param(compiled.qlora, other, footprint.quantized_params), target,
             f"the compiled QLoRA step's argument bytes {compiled.qlora.memory.argument_bytes:,} less the adapters, "
             f"optimizer state, ids and unquantized params ({other:,} bytes), per quantized weight; {shape.describe()}")
  ratio = compiled.qlora.memory.peak_bytes / compiled.lora.memory.peak_bytes
  applies = shape.hidden >= 2048 and shape.layers == 4
  # What the ratio would be if the quantized projections and every temporary cost nothing: the bf16 params QLoRA
  # leaves unquantized (embedding, LM head, norms) with the adapters and their optimizer state, over the bf16 step.
  floor = (footprint.other_bytes + _nbytes(setup.adapters) + opt_bytes) / compiled.lora.memory.peak_bytes
  report.add(f"qlora_lora_memory_ratio{suffix}", ratio, MEMORY_TARGET if applies and headline else None,
             f"{how}: QLoRA {compiled.qlora.memory.describe()}; bf16-base LoRA {compiled.lora.memory.describe()}; "
             f"floor {floor:.3f} (the unquantized params {footprint.other_bytes / _MIB:.1f} MiB, adapters and "
             f"optimizer state over the bf16 step's peak: the ratio if the projections and all temporaries were "
             f"free); {shape.describe()}" + ("" if applies else "; the target is stated for d_model=2048, 4 layers"))
  report.add(f"qlora_lora_argument_ratio{suffix}",
             compiled.qlora.memory.argument_bytes / compiled.lora.memory.argument_bytes, None,
             f"the steps' argument bytes alone (frozen base, adapters, optimizer state, ids), which no backend's "
             f"temporaries change: QLoRA {compiled.qlora.memory.argument_bytes / _MIB:.1f} MiB / bf16-base LoRA "
             f"{compiled.lora.memory.argument_bytes / _MIB:.1f} MiB; {shape.describe()}")
  report.add(f"qlora_step_peak_mib{suffix}", compiled.qlora.memory.peak_bytes / _MIB, None, f"{how}; {shape.describe()}")
  report.add(f"lora_bf16_step_peak_mib{suffix}", compiled.lora.memory.peak_bytes / _MIB, None,
             f"{how}; {shape.describe()}")
  if compiled.qwix is None:
    if not _qwix.available():
      for name in ("qwix_qlora_memory_ratio", "qwix_base_bytes_per_param", "qwix_step_base_bytes_per_param"):
        report.add(f"{name}{suffix}", None, None, _qwix.QWIX_MISSING)
    return  # else: compiled without the peers (the full-depth memory figures)
  qwix_setup = compiled.qwix_setup
  weights, bits = _qwix.stored_bits(qwix_setup.frozen)
  qwix_other = (_nbytes(qwix_setup.adapters) + _nbytes(jax.eval_shape(tx.init, qwix_setup.adapters))
                + _nbytes(setup.ids) + _nbytes({k: v for k, v in qwix_setup.frozen.items()
                                                if k not in _qwix.quantized_leaves(qwix_setup.frozen)}))
  report.add(f"qwix_qlora_memory_ratio{suffix}", compiled.qwix.memory.peak_bytes / compiled.lora.memory.peak_bytes,
             None, f"{how}: qwix {compiled.qwix.memory.describe()}; bf16-base LoRA {compiled.lora.memory.describe()}")
  report.add(f"jlora_qwix_qlora_memory_ratio{suffix}",
             compiled.qlora_bf16a.memory.peak_bytes / compiled.qwix.memory.peak_bytes, None,
             f"{how}, both with bf16 adapters: jlora {compiled.qlora_bf16a.memory.describe()}; qwix "
             f"{compiled.qwix.memory.describe()}; {shape.describe()}")
  if headline:
    report.add("qwix_base_bytes_per_param", bits / 8 / weights, None,
               f"qwix's NF4 weights as their dtypes define them: {_qwix.describe_storage(qwix_setup.frozen)}, no "
               f"double quantization; {weights:,} weights")
  report.add(f"qwix_step_base_bytes_per_param{suffix}",
             _argument_bytes_per_param(compiled.qwix, qwix_other, weights), None,
             f"qwix's compiled step: argument bytes {compiled.qwix.memory.argument_bytes:,} less its adapters, "
             f"optimizer state, ids and unquantized params ({qwix_other:,} bytes), per quantized weight (how the "
             "backend stores uint4 codes shows here)")


def _timed(report: Report, suite: Suite, shape: Shape, compiled: _Compiled, tx, suffix: str) -> None:
  setup = qlora_setup(shape, abstract=False)
  contenders: dict[str, Callable] = {
      "lora_bf16": Stepper(compiled.lora.executable, (copy_tree(setup.adapters), tx.init(setup.adapters)),
                           setup.params, setup.ids),
      "qlora": Stepper(compiled.qlora.executable, (copy_tree(setup.adapters), tx.init(setup.adapters)),
                       setup.qparams, setup.ids)}
  if compiled.qwix is not None:
    contenders["qlora_bf16a"] = Stepper(compiled.qlora_bf16a.executable,
                                        (setup.adapters_bf16a, tx.init(setup.adapters_bf16a)), setup.qparams, setup.ids)
    qwix = _qwix.qwix_setup(setup.model, setup.ids, abstract=False)
    contenders["qwix_qlora"] = Stepper(compiled.qwix.executable, (qwix.adapters, tx.init(qwix.adapters)),
                                       qwix.frozen, setup.ids)
  times = time_interleaved(contenders, warmup=suite.warmup, reps=suite.reps, budget_s=suite.budget_s)
  for name, timing in times.items():
    report.add(f"{name}_step_ms{suffix}", timing.median_s * 1e3, None,
               f"median of {timing.rounds} interleaved rounds (min {timing.min_s * 1e3:.1f} ms, CPU time "
               f"{timing.cpu_median_s * 1e3:.1f} ms); {shape.describe()}")

  def ratio(name: str, ours: str, theirs: str, why: str) -> None:
    if theirs not in times or ours not in times:
      report.add(name, None, None, _qwix.QWIX_MISSING)
      return
    spread = round_ratios(times[ours], times[theirs])
    report.add(name, paired_ratio(times[ours], times[theirs]), None,
               f"{ours} / {theirs}, median of same-round ratios (per-round {min(spread):.3f}..{max(spread):.3f}; "
               f"CPU-time ratio {paired_ratio(times[ours], times[theirs], cpu=True):.3f}); {why}; {shape.describe()}")

  ratio(f"qlora_lora_step_ratio{suffix}", "qlora", "lora_bf16",
        "what dequantizing each NF4 kernel in its module's call (forward, and again in the backward) costs")
  ratio(f"jlora_qwix_qlora_step_ratio{suffix}", "qlora_bf16a", "qwix_qlora",
        "jlora's QLoRA vs qwix's, same model, both with bf16 adapters (qwix's choice)")
  ratio(f"qlora_adapter_dtype_step_ratio{suffix}", "qlora", "qlora_bf16a",
        "jlora's QLoRA with float32 adapters (its default, the recipe) over the same with bf16 adapters")
  ratio(f"qwix_lora_step_ratio{suffix}", "qwix_qlora", "lora_bf16", "qwix's QLoRA over the bf16-base LoRA step")


def _device_peaks(shape: Shape, tx) -> tuple[float | None, str]:
  """On an accelerator, in a fresh process: the QLoRA step's, then the bf16 LoRA step's peak ``bytes_in_use``.

  The device's peak counter only grows, so the smaller step runs first; the model is made and quantized on the
  host CPU and only what the step takes is put on the device, each peak read above the bytes in use before.
  """
  dev = jax.devices()[0]
  if not (dev.memory_stats() or {}).get("peak_bytes_in_use"):
    return None, f"{dev.platform} reports no peak_bytes_in_use"
  with jax.default_device(jax.devices("cpu")[0]):
    host = qlora_setup(shape, abstract=False)
  peaks = {}
  for name, base in (("qlora", host.qparams), ("lora_bf16", host.params)):
    before = dev.memory_stats()["bytes_in_use"]
    adapters, params, ids = jax.device_put((host.adapters, base, host.ids), dev)
    stepper = Stepper(jax.jit(lora_train_step(host.lora, tx), donate_argnums=(0, 1)), (adapters, tx.init(adapters)),
                      params, ids)
    jax.block_until_ready(stepper())
    peaks[name] = dev.memory_stats()["peak_bytes_in_use"] - before
    del stepper, adapters, params, ids
  return peaks["qlora"] / peaks["lora_bf16"], (f"device memory_stats peak_bytes_in_use: QLoRA "
                                                f"{peaks['qlora'] / _MIB:.0f} MiB / bf16 LoRA "
                                                f"{peaks['lora_bf16'] / _MIB:.0f} MiB; {shape.describe()}")


def qlora_section(report: Report, suite: Suite, log: Callable[[str], None], *, alone: bool = False) -> None:
  """The QLoRA figures: memory on ``suite.memory_shape`` (the headline, with the targets), memory and step time on
  the suite's headline train shape. ``alone`` (``--only qlora``, a fresh process) adds the device peaks on an
  accelerator."""
  tx = optimizer()
  memory_shape, time_shape = suite.memory_shape, suite.train_shapes[-1]
  if alone and jax.devices()[0].platform != "cpu":
    value, detail = _device_peaks(memory_shape, tx)
    report.add("qlora_lora_device_memory_ratio", value, MEMORY_TARGET, detail)
  for shape in dict.fromkeys((memory_shape, time_shape)):
    headline = shape == memory_shape
    suffix = "" if headline else f"@{shape.label}"
    log(f"qlora {shape.label}: compiling bf16 LoRA, QLoRA and qwix steps ({shape.describe()})")
    start = time.perf_counter()
    setup = qlora_setup(shape, abstract=True)
    compiled = _compile(setup, tx)
    log(f"qlora {shape.label}: compiled in {time.perf_counter() - start:.0f} s")
    _memory_figures(report, shape, setup, compiled, tx, headline=headline, suffix=suffix)
    if shape == time_shape:
      log(f"qlora {shape.label}: timing")
      _timed(report, suite, shape, compiled, tx, "")
    del compiled
  if memory_shape.hidden == 2048 and memory_shape.layers < FULL_DEPTH:
    deep = dataclasses.replace(memory_shape, layers=FULL_DEPTH)
    log(f"qlora {deep.label}: compiling bf16 LoRA and QLoRA at {FULL_DEPTH} layers (memory only)")
    setup = qlora_setup(deep, abstract=True)
    _memory_figures(report, deep, setup, _compile(setup, tx, peers=False), tx, headline=False,
                    suffix=f"@{deep.label}_l{FULL_DEPTH}")
