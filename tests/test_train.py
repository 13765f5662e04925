"""The training job end to end on the real MiniLM: smoke, outputs, exact resume, non-finite policy."""

import json
import os
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


def _run_job(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "train", "--config", "configs/minilm_docs.py:smoke", "--workdir", workdir,
         "--config.checkpoint.every=4", "--config.checkpoint.use_async=False", "--config.mesh.num_devices=1", *extra]
  return (subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600) if wait
          else subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)


def test_exact_resume_after_kill9_then_sigterm(tmp_path):
  """A run killed (-9), resumed, stopped by SIGTERM and resumed again ends bitwise equal to an uninterrupted run.

  kill -9 lands between saves: steps after checkpoint 4 are lost and re-done. SIGTERM saves after the
  current step and exits 143. Every re-done step must log the identical loss.
  """
  reference = str(tmp_path / "reference")
  result = _run_job(reference)
  assert result.returncode == 0, result.stderr
  interrupted = str(tmp_path / "interrupted")
  proc = _run_job(interrupted, wait=False)
  _wait_for_checkpoint(interrupted, 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  proc = _run_job(interrupted, wait=False)
  _wait_for_checkpoint(interrupted, 8, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143, proc.stderr.read()
  assert "Resumed from" in proc.stderr.read()
  assert not os.path.exists(os.path.join(interrupted, "adapter"))
  resumed = _run_job(interrupted)
  assert resumed.returncode == 0, resumed.stderr
  assert "Resumed from" in resumed.stderr
  chex.assert_trees_all_equal(_final_adapters(interrupted), _final_adapters(reference))
  losses = lambda wd: {r["step"]: r["train/loss"] for r in read_metrics(wd) if "train/loss" in r}  # noqa: E731
  ref, got = losses(reference), losses(interrupted)
  assert all(got[s] == ref[s] for s in ref)  # re-done steps log the identical loss


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
