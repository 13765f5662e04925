"""The training job end to end on the real MiniLM: smoke, outputs, exact resume, non-finite policy."""

import glob
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import jlora
from train import train as train_lib
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  from configs import minilm_docs

  config = minilm_docs.get_config("smoke")
  config.mesh.num_devices = 1  # the test session has 8 fake devices; the smoke batch is for one
  config.update_from_flattened_dict(overrides)
  return config


def _tensorboard_tags(directory: str) -> set[str]:
  """Reads TensorBoard event files (TFRecord framing + Event protos) without TensorFlow."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      blob = f.read()
    offset = 0
    while offset < len(blob):
      (length,) = struct.unpack("<Q", blob[offset : offset + 8])
      event = event_pb2.Event.FromString(blob[offset + 12 : offset + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      offset += 12 + length + 4
  return tags


def _final_adapters(workdir: str):
  with open(os.path.join(workdir, "adapter", "jlora_adapter.json")) as f:
    assert json.load(f)["format"] == "jlora-adapter/1"
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(workdir, "adapter", "adapters"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  return workdir, train_lib.train_and_evaluate(_config(), workdir)


def test_smoke_learns_and_writes_everything(smoke_run):
  workdir, result = smoke_run
  assert result["before"]["eval/loss"] > result["after"]["eval/loss"]
  assert result["after"]["eval/accuracy"] > result["before"]["eval/accuracy"] + 0.1
  rows = read_metrics(workdir)
  train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert train_losses[-1] < train_losses[0]
  assert [r["step"] for r in rows if "eval/loss" in r] == [0, 6, 12]
  assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/loss", "eval/accuracy"} <= _tensorboard_tags(
      os.path.join(workdir, "tensorboard"))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  assert not os.path.exists(os.path.join(workdir, "adapter.partial"))  # the export was swapped in


def test_exported_adapter_loads_without_training_state(smoke_run):
  workdir, result = smoke_run
  metadata = jlora.load_adapter_metadata(os.path.join(workdir, "adapter"))
  assert metadata["lora_config"].rank == 8 and metadata["extra"]["task"] == "classification"
  assert metadata["base_fingerprint"].startswith("sha256:") and metadata["extra"]["step"] == 12
  adapters = _final_adapters(workdir)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), adapters)
  restored, config = jlora.load_adapters(os.path.join(workdir, "adapter"), target,
                                         base_fingerprint=metadata["base_fingerprint"])
  chex.assert_trees_all_equal(restored, adapters)


def test_registered_tfds_dataset_by_name(smoke_run, tmp_path):
  """config.data.tfds.name reads any prepared TFDS dataset by name (here the one the smoke run built)."""
  smoke_workdir, _ = smoke_run
  config = _config(**{"data.tfds.name": "jlora_jsonl_classification/stdlib_docs",
                      "data.tfds.data_dir": os.path.join(smoke_workdir, "data", "tfds"),
                      "train.steps": 4, "train.eval_every": 4, "checkpoint.every": 4})
  result = train_lib.train_and_evaluate(config, str(tmp_path / "by_name"))
  assert not os.path.exists(tmp_path / "by_name" / "data")  # nothing was rebuilt
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"]


class _Job:
  """``python -m train`` on the smoke config in a subprocess, as a user runs it: the shipped defaults (async
  checkpoints), the test session's environment (its JAX compilation cache), output to files (a full pipe would
  stall the job)."""

  running: list["_Job"] = []  # killed by the jobs fixture when a test fails before its job ends

  def __init__(self, workdir: str, log_dir, name: str, *, checkpoint_every: int = 2):
    self.workdir, self.out, self.err = workdir, log_dir / f"{name}.out", log_dir / f"{name}.err"
    self.metrics = os.path.join(workdir, "metrics.jsonl")
    self.started_ns = time.time_ns()
    self._metrics_offset = os.path.getsize(self.metrics) if os.path.exists(self.metrics) else 0
    cmd = [sys.executable, "-m", "train", "--config", "configs/minilm_docs.py:smoke", "--workdir", workdir,
           "--config.mesh.num_devices=1", f"--config.checkpoint.every={checkpoint_every}", "--config.train.log_every=1",
           "--config.train.eval_every=12"]
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
    _Job.running.append(self)

  def stdout(self) -> str:
    return self.out.read_text()

  def stderr(self) -> str:
    return self.err.read_text()

  def wait(self, timeout: float = 600) -> int:
    return self.proc.wait(timeout=timeout)

  def wait_for(self, condition, what: str, timeout: float = 300):
    """Polls ``condition()`` every millisecond until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
      assert self.proc.poll() is None, f"the job exited ({self.proc.returncode}) before {what}:\n{self.stderr()[-3000:]}"
      assert time.monotonic() < deadline, f"no {what} within {timeout}s"
      time.sleep(0.001)
    return found

  def trained_step(self) -> int:
    """The last step this run logged a training loss for (0 if none yet)."""
    if not os.path.exists(self.metrics):
      return 0
    with open(self.metrics) as f:
      f.seek(self._metrics_offset)
      rows = [json.loads(line) for line in f.read().split("\n")[:-1]]  # the last one may be mid-write
    return max((r["step"] for r in rows if "train/loss" in r), default=0)

  def resumed_from(self) -> int | None:
    steps = re.findall(r"Resumed from \S+ at step (\d+)\.", self.stderr())
    assert len(steps) <= 1, steps
    return int(steps[0]) if steps else None

  def kill(self, sig=signal.SIGKILL) -> int:
    self.proc.send_signal(sig)
    return self.wait(timeout=120)


@pytest.fixture
def jobs():
  yield _Job
  for job in _Job.running:
    if job.proc.poll() is None:
      job.kill()
  _Job.running.clear()


def _checkpoint_dirs(workdir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, orbax temporary directories of unfinished saves) in ``workdir/checkpoints``."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if ".orbax-checkpoint-tmp" in n)


def _saving(job: _Job, after_step: int) -> str | None:
  """A temporary directory of a save of a step past ``after_step`` that this run made (orbax removes a killed
  run's leftover one and makes it anew when it saves that step again), once there is one."""
  for name in _checkpoint_dirs(job.workdir)[1]:
    try:
      made = os.stat(os.path.join(job.workdir, "checkpoints", name)).st_ctime_ns
    except FileNotFoundError:  # finalized (renamed) since the listing
      continue
    if int(name.split(".")[0]) > after_step and made >= job.started_ns:
      return name
  return None


def _metric_rows(workdir: str, name: str) -> dict[int, list[float]]:
  rows = {}
  for row in read_metrics(workdir):
    if name in row:
      rows.setdefault(row["step"], []).append(row[name])
  return rows


def test_kill9_inside_saves_sigterm_then_rerun(smoke_run, tmp_path, jobs):
  """kill -9 three times in one workdir (the moment orbax's temporary step directory appears, a seeded moment
  inside a save, a seeded moment after a training step), SIGTERM, kill -9 inside the final adapter export, then
  the same command once more.

  Every restart resumes from the latest finalized checkpoint; SIGTERM saves the step the job reached; every
  re-done step logs the reference's loss; the last run finds the job complete, exits 0 and exports the adapter
  the kill interrupted, bitwise the uninterrupted run's (``smoke_run``: the same job in-process, with
  checkpoints every 6 steps instead of 2, the train loss logged every 2 steps instead of every step, and an
  eval at step 6 too).
  """
  reference_dir, reference = smoke_run
  workdir = str(tmp_path / "interrupted")
  rng = random.Random(12)
  expected_resume = None  # no checkpoint before the first run
  kills = [
      ("the moment a save's temporary directory appears",
       lambda job, start: job.wait_for(lambda: _saving(job, max(start, 2)), "a save past step 2")),
      ("a seeded moment inside a save",  # of the save after the next one: resumes advance
       lambda job, start: (job.wait_for(lambda: _saving(job, start + 2), "a save"), time.sleep(rng.uniform(0, 0.02)))),
      ("a seeded moment after a training step",
       lambda job, start: (job.wait_for(lambda: job.trained_step() >= start + rng.randint(1, 3), "training"),
                           time.sleep(rng.uniform(0, 0.05)))),
  ]
  for k, (moment, wait_for_moment) in enumerate(kills):
    job = jobs(workdir, tmp_path, f"kill{k}")
    wait_for_moment(job, expected_resume or 0)
    assert job.kill() == -signal.SIGKILL, f"kill {k} ({moment}) came too late:\n{job.stderr()[-3000:]}"
    assert job.resumed_from() == expected_resume, (k, moment)
    finalized, unfinished = _checkpoint_dirs(workdir)
    if k == 0:
      assert unfinished, "the first kill -9 did not land inside a save"
    print(f"kill -9 at {moment}: finalized {finalized}, unfinished {unfinished}")
    expected_resume = max(finalized, default=None)

  job = jobs(workdir, tmp_path, "sigterm", checkpoint_every=0)  # no periodic saves: only SIGTERM's
  job.wait_for(lambda: job.trained_step() > (expected_resume or 0), "a trained step")
  reached = job.trained_step()
  assert job.kill(signal.SIGTERM) == 143, job.stderr()[-3000:]
  assert job.resumed_from() == expected_resume
  saved = int(re.search(r"preempted: checkpoint saved at step (\d+);", job.stderr()).group(1))
  assert reached <= saved < 12
  finalized, unfinished = _checkpoint_dirs(workdir)
  assert saved == max(finalized) and not [n for n in unfinished if n.startswith(f"{saved}.")]
  assert not os.path.exists(os.path.join(workdir, "adapter"))

  job = jobs(workdir, tmp_path, "finish")  # killed once more, inside the export of the adapter
  adapter = os.path.join(workdir, "adapter")
  job.wait_for(lambda: os.path.isdir(adapter + ".partial"), "the adapter's export")
  assert job.kill() == -signal.SIGKILL, job.stderr()[-3000:]
  assert job.resumed_from() == saved
  assert not os.path.exists(adapter) and os.path.isdir(adapter + ".partial")  # killed mid-export
  assert 12 in _checkpoint_dirs(workdir)[0]
  eval_line = "eval after training:  " + "  ".join(f"{k}={v:.4f}" for k, v in reference["after"].items())
  assert eval_line in job.stdout()
  for name, steps in (("train/loss", set(range(1, 13))), ("eval/loss", {0, 12}), ("eval/accuracy", {0, 12})):
    expected, got = _metric_rows(reference_dir, name), _metric_rows(workdir, name)
    assert set(got) == steps, name
    for step, values in got.items():  # a step re-done after a kill logs the same value every time
      assert values == (expected[step] if step in expected else values[:1]) * len(values), (name, step, values)

  rows = read_metrics(workdir)
  job = jobs(workdir, tmp_path, "rerun")  # the same command once more: the job is complete, its export is not
  assert job.wait() == 0, job.stderr()[-3000:]
  assert job.resumed_from() == 12
  assert f"{eval_line}  (logged at step 12; the job was already complete)" in job.stdout()
  chex.assert_trees_all_equal(_final_adapters(workdir), _final_adapters(reference_dir))
  assert not os.path.exists(adapter + ".partial")
  assert read_metrics(workdir) == rows  # nothing trained, nothing logged


def test_finished_job_reruns_and_continues(smoke_run, tmp_path, capsys, caplog):
  """A finished job rerun in place keeps its exported adapter and, without a logged final eval, evaluates its
  restored final state; a larger train.steps trains on from the last step on the new total's schedule; a
  smaller one is refused."""
  from train.optimizer import learning_rate_schedule

  source, reference = smoke_run
  workdir = str(tmp_path / "finished")
  shutil.copytree(source, workdir)
  adapter_files = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(workdir, "adapter", "**"), recursive=True)}
  rows = [r for r in read_metrics(workdir) if not (r["step"] == 12 and "eval/loss" in r)]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  capsys.readouterr()
  rerun = train_lib.train_and_evaluate(_config(), workdir)
  assert rerun["already_complete"] and rerun["steps"] == 12 and rerun["before"] is None
  assert rerun["after"] == reference["after"]  # the restored final state evaluates exactly as it did in the run
  out = capsys.readouterr().out
  assert "(evaluated from the checkpoint of step 12; the job was already complete)" in out
  assert "(step 12) kept" in out
  assert {p: os.stat(p).st_mtime_ns for p in adapter_files} == adapter_files  # not rewritten
  assert read_metrics(workdir) == rows
  with pytest.raises(train_lib.WorkdirStateError, match="checkpoint at step 12, past train.steps=8"):
    train_lib.train_and_evaluate(_config(**{"train.steps": 8}), workdir)

  config = _config(**{"train.steps": 16})
  longer = train_lib.train_and_evaluate(config, workdir)
  assert not longer["already_complete"] and longer["steps"] == 16 and longer["before"] is None
  assert "train.steps changed from 12 (when this checkpoint was written) to 16" in caplog.text
  new_rows = read_metrics(workdir)[len(rows):]
  schedule = learning_rate_schedule(config.optimizer, 16)
  assert [(r["step"], r["train/learning_rate"]) for r in new_rows if "train/loss" in r] == [
      (step, float(schedule(step - 1))) for step in (14, 16)]
  assert [r["step"] for r in new_rows if "eval/loss" in r] == [16]
  assert jlora.load_adapter_metadata(os.path.join(workdir, "adapter"))["extra"]["step"] == 16
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "16"]


def test_indivisible_batch_is_a_config_error(tmp_path):
  with pytest.raises(ValueError, match="divisible by the 8 batch shards"):
    train_lib.train_and_evaluate(_config(**{"mesh.num_devices": 0}), str(tmp_path / "wd"))


def test_nonfinite_stops_or_skips(tmp_path):
  short = {"optimizer.learning_rate": 1e38, "optimizer.grad_clip_norm": 0.0, "train.steps": 4, "train.eval_every": 4,
           "checkpoint.every": 4}
  with pytest.raises(train_lib.NonFiniteError, match="not finite"):
    train_lib.train_and_evaluate(_config(**short), str(tmp_path / "stop"))
  result = train_lib.train_and_evaluate(_config(**short, **{"train.on_nonfinite": "skip"}), str(tmp_path / "skip"))
  assert result["skipped_steps"] > 0
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(_final_adapters(str(tmp_path / "skip"))))


def test_llama_sft_smoke(tmp_path):
  """Causal-LM SFT on a tiny Llama checkpoint created locally (HF format + BPE tokenizer), packed rows."""
  from configs import llama_sft

  workdir = str(tmp_path / "sft")
  config = llama_sft.get_config("smoke")
  config.mesh.num_devices = 1
  result = train_lib.train_and_evaluate(config, workdir)
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"]
  assert result["after"]["eval/perplexity"] < result["before"]["eval/perplexity"]
  train_losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
  assert train_losses[-1] < train_losses[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "8"]
  metadata = jlora.load_adapter_metadata(os.path.join(workdir, "adapter"))
  assert metadata["extra"]["task"] == "causal_lm" and metadata["lora_config"].rank == 16
