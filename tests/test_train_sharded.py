"""The training job sharded: meshes, real multi-process runs, cross-mesh restore, a dying process.

Runs the causal-LM SFT smoke config on a tiny Llama checkpoint created once; in-process runs use the
8 fake CPU devices of the test session, multi-process runs use tools.launch_local (gloo collectives).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import chex
import jax
import orbax.checkpoint as ocp
import pytest

import jlora
from train import train as train_lib
from train.metrics import read_metrics
from train.tasks import pydoc_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pure data parallelism over 8 devices is checked at the train-step level (tests/test_sharding_adapters.py) and,
# with fsdp and tensor axes, by the 2x2x2 two-process run below; the job-level runs here cover the model axes.
MESHES = {  # name: (axes, number of devices)
    "1x1": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "2x4_fsdp_tensor": ({"data": 1, "fsdp": 2, "tensor": 4}, 8),
    "1x8_tensor": ({"data": 1, "fsdp": 1, "tensor": 8}, 8),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return pydoc_sft.create_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


def _config(checkpoint, axes, num_devices, **overrides):
  from configs import llama_sft

  config = llama_sft.get_config("smoke")
  config.model.path = checkpoint
  config.data.batch_size = 16
  config.data.eval_batch_size = 8
  config.train.steps = 8
  config.train.eval_every = 8
  config.checkpoint.every = 4
  config.checkpoint.use_async = False
  config.mesh.axes = axes
  config.mesh.num_devices = num_devices
  config.update_from_flattened_dict(overrides)
  return config


def _adapters(workdir):
  """The exported adapter, restored onto one local device whatever mesh and process count saved it."""
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(os.path.join(workdir, "adapter", "adapters"))
  tree = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(tree))
  return jlora.load_adapters(os.path.join(workdir, "adapter"), target)[0]


def _losses(workdir):
  return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def mesh_runs(checkpoint, tmp_path_factory):
  runs = {}
  for name, (axes, n) in MESHES.items():
    workdir = str(tmp_path_factory.mktemp(name))
    train_lib.train_and_evaluate(_config(checkpoint, axes, n), workdir)
    runs[name] = workdir
  return runs


@pytest.mark.parametrize("name", [m for m in MESHES if m != "1x1"])
def test_meshes_equal_single_device(mesh_runs, name):
  reference, run = mesh_runs["1x1"], mesh_runs[name]
  chex.assert_trees_all_close(_losses(run), _losses(reference), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(_adapters(run), _adapters(reference), atol=1e-5, rtol=0)


def _launch(workdir, checkpoint, *flags, processes=2, timeout=600):
  command = [sys.executable, "-m", "tools.launch_local", "--processes", str(processes), "--devices-per-process",
             str(8 // processes), "--", sys.executable, "-m", "train", "--config", "configs/llama_sft.py:smoke",
             "--workdir", workdir, f"--config.model.path={checkpoint}", "--config.data.batch_size=16",
             "--config.data.eval_batch_size=8", "--config.train.steps=8", "--config.train.eval_every=8",
             "--config.checkpoint.every=4", "--config.checkpoint.use_async=False", *flags]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


MP_MESH = ("--config.mesh.axes.data=2", "--config.mesh.axes.fsdp=2", "--config.mesh.axes.tensor=2")


@pytest.fixture(scope="module")
def two_process_run(checkpoint, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_process"))
  result = _launch(workdir, checkpoint, *MP_MESH)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return workdir, result.stdout


def test_two_processes_equal_one_process(two_process_run, mesh_runs):
  workdir, stdout = two_process_run
  assert "[1] " in stdout and "[0] eval after training" in stdout
  assert "[1] eval after training" not in stdout  # only process 0 prints and writes metrics
  chex.assert_trees_all_close(_losses(workdir), _losses(mesh_runs["1x1"]), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(_adapters(workdir), _adapters(mesh_runs["1x1"]), atol=1e-5, rtol=0)


# QLoRA: an NF4 base (quantized after loading) in blocks of 32, so that the 2-way fsdp split of the 64-wide input axis
# holds whole blocks; the same job as tests/test_train_qlora.py's, which shares its compiled programs.
QLORA = {"model.quantize": "nf4", "model.block_size": 32}


@pytest.fixture(scope="module")
def qlora_runs(checkpoint, tmp_path_factory):
  """The QLoRA job in one process on one device, and in two processes on the 2x2x2 mesh."""
  one = str(tmp_path_factory.mktemp("qlora_one_process"))
  train_lib.train_and_evaluate(_config(checkpoint, *MESHES["1x1"], **QLORA), one)
  two = str(tmp_path_factory.mktemp("qlora_two_processes"))
  result = _launch(two, checkpoint, *MP_MESH, *(f"--config.{k}={v}" for k, v in QLORA.items()))
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return one, two


def _step_memory(workdir):
  with open(os.path.join(workdir, "train_step_memory.json")) as f:
    return json.load(f)


def test_qlora_two_processes_equal_one_process(qlora_runs):
  one, two = qlora_runs
  chex.assert_trees_all_close(_losses(two), _losses(one), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(_adapters(two), _adapters(one), atol=1e-5, rtol=0)
  fingerprints = [jlora.load_adapter_metadata(os.path.join(w, "adapter"))["base_fingerprint"] for w in (one, two)]
  assert fingerprints[0] == fingerprints[1]  # one quantized base, however it was sharded
  # Each device held its shard of the codes and statistics (fsdp x tensor = 4 ways), not the whole base.
  assert _step_memory(two)["argument_bytes"] < 0.5 * _step_memory(one)["argument_bytes"]


def _rewind_to_step_4(source, destination):
  shutil.copytree(source, destination)
  shutil.rmtree(os.path.join(destination, "checkpoints", "8"))
  shutil.rmtree(os.path.join(destination, "adapter"))
  assert os.listdir(os.path.join(destination, "checkpoints")) == ["4"]


def test_checkpoint_from_two_processes_restores_in_one_on_another_mesh(two_process_run, checkpoint, tmp_path):
  source, _ = two_process_run
  workdir = str(tmp_path / "resumed")
  _rewind_to_step_4(source, workdir)
  result = train_lib.train_and_evaluate(_config(checkpoint, *MESHES["1x8_tensor"]), workdir)
  assert result["before"] is None and result["steps"] == 8  # resumed, not restarted
  chex.assert_trees_all_close(_adapters(workdir), _adapters(source), atol=1e-5, rtol=0)


def test_checkpoint_from_one_process_restores_in_two(mesh_runs, checkpoint, tmp_path):
  source = mesh_runs["2x4_fsdp_tensor"]
  workdir = str(tmp_path / "resumed")
  _rewind_to_step_4(source, workdir)
  result = _launch(workdir, checkpoint, *MP_MESH)
  assert result.returncode == 0, result.stdout[-4000:]
  assert "Resumed from" in result.stdout
  chex.assert_trees_all_close(_adapters(workdir), _adapters(source), atol=1e-5, rtol=0)


def test_a_killed_process_fails_the_survivor_in_bounded_time(checkpoint, tmp_path):
  """Process 1 is killed mid-run; process 0 must exit non-zero with a message, well within the timeout."""
  timeout = 5
  port = __import__("tools.launch_local", fromlist=["free_port"]).free_port()
  procs = []
  for index in range(2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JLORA_COORDINATOR=f"127.0.0.1:{port}", JLORA_NUM_PROCESSES="2", JLORA_PROCESS_ID=str(index),
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "train", "--config", "configs/llama_sft.py:smoke", "--workdir",
               str(tmp_path / "wd"), f"--config.model.path={checkpoint}", "--config.train.steps=100000",
               f"--config.distributed.heartbeat_timeout_seconds={timeout}", *MP_MESH]
    procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  survivor, victim = procs
  deadline = time.time() + 300
  while not os.path.exists(tmp_path / "wd" / "metrics.jsonl"):  # both are training
    assert time.time() < deadline and survivor.poll() is None
    time.sleep(0.2)
  victim.kill()
  killed_at = time.time()
  try:
    code = survivor.wait(timeout=timeout + 60)
  finally:
    survivor.kill()
  elapsed = time.time() - killed_at
  output = survivor.stdout.read()
  assert code != 0
  # JAX's coordination service (hosted by process 0) names the task that stopped sending heartbeats: process 1.
  assert _names_dead_task(output, 1), output[-3000:]
  assert not _names_dead_task(output, 0)
  assert elapsed < timeout + 60, elapsed


def _names_dead_task(output: str, task: int) -> bool:
  """Whether the output says that task ``task`` (its process id) stopped sending heartbeats."""
  return bool(re.search(rf"\bTask {task} heartbeat timeout\b", output)
              or re.search(rf"tasks are unhealthy \(stopped sending heartbeats\):\s*{task}\s", output))
