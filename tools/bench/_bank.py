"""Mixed-adapter batches (``jlora.AdapterBank``): what serving 16 adapters in one batch costs.

For one decoder and a batch of 16 rows, each section times, in the same interleaved rounds:

* ``bank16``: the bank with 16 distinct adapters, one per row (the default kernel, BGMV on CPU);
* ``bank1``: the same bank program with every row on one slot;
* ``lora``: ``jlora.Lora`` with that one adapter, the dedicated single-adapter program on the same batch;
* ``sgmv16``: the bank with rows grouped by adapter (``AdapterBank(kernel="sgmv")``), 16 distinct adapters;
* ``peft16`` / ``peft1``: Hugging Face PEFT on torch with the same 16 adapters, mixed-batch forward
  (``adapter_names=``), and with one adapter active (prefill only).

Two phases: **prefill** (a forward over ``T`` tokens per row) and a **decode step** (one token per row
against a KV cache of ``T`` tokens). Every adapter has rank 16 on the seven projections (the recipe of
``_models``), with random non-zero ``B``.
"""

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jlora
from jlora import models
from tools.bench._models import LORA_ALPHA, LORA_RANK, PROJECTIONS, Shape, lora_config, with_trained_b
from tools.bench._report import Report
from tools.bench._suites import Suite
from tools.bench._timing import paired_ratio, round_ratios, time_interleaved

MIXED_TARGET = 1.15  # 16 distinct adapters / one adapter, same batch, decode step and prefill
PEER_TARGET = 1.0  # jlora mixed batch / PEFT mixed batch
ROWS = 16
DECODE_MAX_ROUNDS = 100  # decode steps are cheap: many rounds average out a shared machine's load

# suite -> (decoder with batch = rows and seq = prefill tokens = cached tokens before the decode step).
SHAPES = {
    "smoke": Shape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256, batch=ROWS, seq=8),
    "quick": Shape(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, vocab=8192, batch=ROWS, seq=64),
    "full": Shape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=16384, batch=ROWS, seq=128),
}


@dataclasses.dataclass(frozen=True)
class BankSetup:
  model: models.LlamaForCausalLM
  params: dict
  state: jlora.BankState
  adapters: list
  lora: jlora.Lora
  ids: jax.Array
  cache: dict
  next_ids: jax.Array


def bank_setup(shape: Shape) -> tuple[BankSetup, jlora.AdapterBank, jlora.AdapterBank]:
  """The decoder, 16 adapters in a bank (and the same bank with the SGMV kernel), a prompt batch and its cache."""
  model = models.LlamaForCausalLM(shape.llama_config(scan=True))
  ids = shape.token_batch(jax.random.key(0))
  params = jax.jit(lambda key: model.init(key, ids)["params"])(jax.random.key(1))
  lora = jlora.Lora(model, lora_config())
  targets = rf".*/({'|'.join(PROJECTIONS)})/kernel"
  bank = jlora.AdapterBank(model, params, ids, targets=targets, slots=ROWS, max_rank=LORA_RANK)
  sgmv = jlora.AdapterBank(model, params, ids, targets=targets, slots=ROWS, max_rank=LORA_RANK, kernel="sgmv")
  state, adapters = bank.init(), []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.AdapterNormWarning)  # random factors: the norm screen is not measured
    for slot in range(ROWS):
      adapters.append(with_trained_b(lora.init(jax.random.key(10 + slot), params, ids), seed=slot))
      state = bank.insert(state, slot, adapters[-1], lora.config)
  cache = models.init_cache(model, shape.batch, shape.seq + 1)
  _, filled = jax.jit(lambda p, c: model.apply({"params": p, "cache": c}, ids, decode=True, mutable=["cache"]))(
      params, cache)
  next_ids = ids[:, -1:]
  return BankSetup(model, params, state, adapters, lora, ids, filled["cache"], next_ids), bank, sgmv


def jlora_contenders(setup: BankSetup, bank: jlora.AdapterBank, sgmv: jlora.AdapterBank
                     ) -> dict[str, Callable[[], jax.Array]]:
  """Prefill and decode-step callables of the bank (16 distinct / one slot), SGMV and the single Lora."""
  params, state, ids, cache, next_ids = setup.params, setup.state, setup.ids, setup.cache, setup.next_ids
  distinct, same = jnp.arange(ROWS, dtype=jnp.int32), jnp.zeros((ROWS,), jnp.int32)
  lora, one = setup.lora, setup.adapters[0]

  def bank_prefill(b):
    return jax.jit(lambda p, s, x, a: b.apply(p, s, x, adapter_ids=a))

  def bank_decode(b):
    return jax.jit(lambda p, s, c, x, a: b.apply(p, s, x, adapter_ids=a, collections={"cache": c}, decode=True,
                                                 mutable=["cache"])[0])

  prefill, decode, sgmv_prefill, sgmv_decode = bank_prefill(bank), bank_decode(bank), bank_prefill(sgmv), \
      bank_decode(sgmv)
  lora_prefill = jax.jit(lambda p, a, x: lora.apply(p, a, x))
  lora_decode = jax.jit(lambda p, a, c, x: lora.apply(p, a, x, collections={"cache": c}, decode=True,
                                                      mutable=["cache"])[0])
  return {
      "bank16_prefill": lambda: prefill(params, state, ids, distinct),
      "bank1_prefill": lambda: prefill(params, state, ids, same),
      "lora_prefill": lambda: lora_prefill(params, one, ids),
      "sgmv16_prefill": lambda: sgmv_prefill(params, state, ids, distinct),
      "bank16_decode": lambda: decode(params, state, cache, next_ids, distinct),
      "bank1_decode": lambda: decode(params, state, cache, next_ids, same),
      "lora_decode": lambda: lora_decode(params, one, cache, next_ids),
      "sgmv16_decode": lambda: sgmv_decode(params, state, cache, next_ids, distinct),
  }


def peft_contenders(shape: Shape, threads: int) -> tuple[dict[str, Callable[[], None]], str] | str:
  """PEFT's mixed-batch forward (``adapter_names=``, 16 adapters) and its one-adapter forward, same shapes."""
  try:
    import peft
    import torch
    import transformers
  except ImportError as error:
    return f"torch/transformers/peft not importable ({error}); install the test extras to compare with PEFT"
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                    intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                                    num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                    max_position_embeddings=max(2048, shape.seq), tie_word_embeddings=False,
                                    use_cache=False)
  recipe = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS))
  model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(**recipe), adapter_name="a0")
  for i in range(1, ROWS):
    model.add_adapter(f"a{i}", peft.LoraConfig(**recipe))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_B" in name:
        param.normal_(0.0, 0.01)
  model.eval()
  ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
  names = [f"a{i}" for i in range(ROWS)]

  def mixed() -> None:
    with torch.no_grad():
      model(input_ids=ids, adapter_names=names)

  def one() -> None:
    with torch.no_grad():
      model(input_ids=ids)

  attention = getattr(model.config, "_attn_implementation", "default")
  detail = (f"PEFT {peft.__version__} on transformers {transformers.__version__} LlamaForCausalLM, 16 LoRA adapters "
            f"(rank {LORA_RANK}, seven projections), torch {torch.__version__} with {threads} threads, attention "
            f"{attention}")
  return {"peft16_prefill": mixed, "peft1_prefill": one}, detail


def bank_section(report: Report, suite: Suite, threads: int, log: Callable[[str], None]) -> None:
  """The mixed-batch figures of ``suite`` (see the module docstring)."""
  shape = SHAPES[suite.name]
  log(f"bank: {ROWS} adapters, {shape.describe()}")
  setup, bank, sgmv = bank_setup(shape)
  contenders = jlora_contenders(setup, bank, sgmv)
  peft = peft_contenders(shape, threads)
  peft_reason = peft if isinstance(peft, str) else ""
  if not peft_reason:
    contenders.update(peft[0])
  # Each phase is timed in its own interleaved rounds: a decode step takes ~1/30 of a prefill, and in rounds shared
  # with the prefills (seconds each, PEFT's tens of seconds) it would get only suite.reps samples over minutes of
  # drifting load; alone it gets up to DECODE_MAX_ROUNDS rounds within the same budget.
  times = {}
  for phase, max_reps in (("prefill", 25), ("decode", DECODE_MAX_ROUNDS)):
    group = {name: fn for name, fn in contenders.items() if name.endswith(f"_{phase}")}
    log(f"bank: timing {', '.join(group)}")
    times.update(time_interleaved(group, warmup=max(1, suite.warmup), reps=suite.reps, budget_s=suite.budget_s,
                                  max_reps=max_reps))
  where = (f"{ROWS} rows, {shape.describe().replace(f'batch={ROWS}, T={shape.seq}', f'T={shape.seq}')}; rank "
           f"{LORA_RANK} on the seven projections, nn.scan layers")
  for name, timing in times.items():
    report.add(f"bank_{name}_ms", timing.median_s * 1e3, None,
               f"median of {timing.rounds} interleaved rounds (min {timing.min_s * 1e3:.2f}); {where}")

  def ratio(name: str, ours: str, theirs: str, target: float | None, why: str) -> None:
    spread = round_ratios(times[ours], times[theirs])
    report.add(name, paired_ratio(times[ours], times[theirs]), target,
               f"{ours} {times[ours].median_s * 1e3:.2f} ms / {theirs} {times[theirs].median_s * 1e3:.2f} ms, median "
               f"of same-round ratios (per-round {min(spread):.3f}..{max(spread):.3f}; CPU-time ratio "
               f"{paired_ratio(times[ours], times[theirs], cpu=True):.3f}); {why}; {where}")

  for phase, what in (("prefill", f"a forward over {shape.seq} tokens per row"),
                      ("decode", f"one decode step against a KV cache of {shape.seq} tokens")):
    ratio(f"bank_mixed_one_{phase}_ratio", f"bank16_{phase}", f"lora_{phase}", MIXED_TARGET,
          f"{what}: 16 distinct adapters in one AdapterBank batch over one adapter (jlora.Lora) on the same batch")
    ratio(f"bank_distinct_same_{phase}_ratio", f"bank16_{phase}", f"bank1_{phase}", None,
          f"{what}: the same bank program with 16 distinct slots over every row on one slot")
    ratio(f"bank_sgmv_bgmv_{phase}_ratio", f"sgmv16_{phase}", f"bank16_{phase}", None,
          f"{what}: rows grouped by adapter (SGMV, ragged_dot) over gathered per row (BGMV), 16 distinct adapters")
  if peft_reason:
    report.add("jlora_peft_mixed_prefill_ratio", None, PEER_TARGET, peft_reason)
    return
  ratio("jlora_peft_mixed_prefill_ratio", "bank16_prefill", "peft16_prefill", PEER_TARGET,
        f"prefill, 16 distinct adapters: jlora's AdapterBank over PEFT's adapter_names= forward; {peft[1]}")
  ratio("peft_mixed_one_prefill_ratio", "peft16_prefill", "peft1_prefill", None,
        "PEFT's own cost of 16 distinct adapters over one active adapter (it loops over the adapters in each layer)")
