"""Greedy answers to held-out prompts, scored against their references with exact match and ROUGE-L.

The job calls it before training and after the last step. Each call decodes every prompt greedily with
the KV cache (``jlora.models.generate`` through ``lora.apply_fn()``, so the adapters are not merged and
one compiled program serves both calls), cuts each answer at the first end-of-turn token, scores it
(``train.text_metrics``), writes ``generations/step_<step>.jsonl`` in the workdir and prints the scores.
After training it also prints the first few prompts with the reference and both answers, before and
after, read back from the file of step 0.
"""

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import tokenizers

import jlora
from jlora import models
from train import text_metrics


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One held-out prompt.

  Attributes:
    label: what a person reads as the question (e.g. the user turn).
    text: the prompt exactly as the model sees it (chat template applied, generation prompt included).
    reference: the expected answer.
  """

  label: str
  text: str
  reference: str


class GenerationEval:
  """``(trainable, params, step) -> {"eval/exact_match", "eval/rouge_l"}``; see the module docstring.

  Args:
    model: the causal LM.
    lora: its LoRA transform (``trainable["lora"]`` are its adapters).
    tokenizer: the model's tokenizer.
    prompts: the held-out prompts.
    workdir: where ``generations/`` goes.
    max_new_tokens: answer length limit, in tokens.
    batch_size: prompts decoded together (the last batch is filled up with repeats, then dropped).
    eos_ids: tokens that end an answer.
    shown: how many prompts to print before/after, after training.
  """

  def __init__(self, *, model, lora: jlora.Lora, tokenizer: tokenizers.Tokenizer, prompts: Sequence[Prompt],
               workdir: str, max_new_tokens: int, batch_size: int, eos_ids: Sequence[int], shown: int = 3):
    if not prompts:
      raise ValueError("GenerationEval needs at least one prompt.")
    self.model, self.lora, self.tokenizer, self.prompts = model, lora, tokenizer, list(prompts)
    self.directory = os.path.join(workdir, "generations")
    self.max_new_tokens, self.batch_size, self.eos_ids, self.shown = max_new_tokens, batch_size, tuple(eos_ids), shown
    encoded = [tokenizer.encode(p.text, add_special_tokens=False).ids for p in self.prompts]
    width = max(len(ids) for ids in encoded)
    rows = -(-len(encoded) // batch_size) * batch_size
    self.ids = np.zeros((rows, width), np.int32)
    self.mask = np.zeros((rows, width), np.int32)
    for row in range(rows):
      ids = encoded[row % len(encoded)]
      self.ids[row, width - len(ids):] = ids  # left padding: every prompt ends where decoding starts
      self.mask[row, width - len(ids):] = 1

  def answers(self, trainable: dict, params) -> list[str]:
    """The greedy answer to every prompt, decoded up to (not including) the first end token."""
    injected = self.lora.inject(params, trainable["lora"])
    width, out = self.ids.shape[1], []
    for start in range(0, len(self.ids), self.batch_size):
      rows = slice(start, start + self.batch_size)
      tokens = models.generate(self.model, injected, self.ids[rows], self.mask[rows],
                               max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_ids or None,
                               apply_fn=self.lora.apply_fn())
      for row in np.asarray(jax.device_get(tokens))[:, width:]:
        ends = [i for i, token in enumerate(row.tolist()) if token in self.eos_ids]
        out.append(self.tokenizer.decode(row[:ends[0] if ends else len(row)].tolist(), skip_special_tokens=True))
    return [answer.strip() for answer in out[:len(self.prompts)]]

  def __call__(self, trainable: dict, params, step: int) -> dict[str, float]:
    started = time.perf_counter()
    answers = self.answers(trainable, params)
    references = [p.reference for p in self.prompts]
    scores = text_metrics.corpus_scores(answers, references)
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      with open(os.path.join(self.directory, f"step_{step}.jsonl"), "w") as f:
        for prompt, answer in zip(self.prompts, answers):
          f.write(json.dumps({"label": prompt.label, "reference": prompt.reference, "answer": answer,
                              "exact_match": text_metrics.exact_match(answer, prompt.reference),
                              "rouge_l": text_metrics.rouge_l(answer, prompt.reference)}) + "\n")
      print(f"generation eval at step {step}: {len(self.prompts)} held-out prompts, greedy, at most "
            f"{self.max_new_tokens} new tokens ({time.perf_counter() - started:.0f} s): "
            f"exact_match={scores['exact_match']:.4f}  rouge_l={scores['rouge_l']:.4f}", flush=True)
      if step > 0:
        self._print_before_after(answers)
    return {"eval/exact_match": scores["exact_match"], "eval/rouge_l": scores["rouge_l"]}

  def _print_before_after(self, answers: list[str]) -> None:
    before_file = os.path.join(self.directory, "step_0.jsonl")
    if not self.shown or not os.path.exists(before_file):
      return
    with open(before_file) as f:
      before = [json.loads(line)["answer"] for line in f]
    for i, prompt in enumerate(self.prompts[:self.shown]):
      lines = [f"[{i + 1}] {prompt.label}", f"    reference: {prompt.reference}",
               f"    before:    {_one_line(before[i]) if i < len(before) else '?'}",
               f"    after:     {_one_line(answers[i])}"]
      print("\n".join(lines), file=sys.stdout, flush=True)


def _one_line(text: str, limit: int = 200) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def spread(count: int, total: int) -> list[int]:
  """``count`` indices spread evenly over ``range(total)`` (all of them when ``count >= total``)."""
  if count >= total:
    return list(range(total))
  return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})
