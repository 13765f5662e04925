"""Every adapter variant in the training job (train/variants.py, train/relora.py, train/optimizer.py).

One job-level run: DoRA with ReLoRA restarts on the llama_sft smoke config, uninterrupted and preempted at a restart
step then resumed (bitwise the same). The other variants (VeRA, AdaLoRA, PiSSA/OLoRA) run through the job's own
pieces (its config -> LoraConfig, init and base changes, optimizer, loss, train step, export form) at train-step level.
"""

import contextlib
import io
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora import models
from train import relora as relora_lib
from train import train as train_lib
from train import variants
from train.metrics import read_metrics
from train.optimizer import learning_rate_schedule, make_optimizer
from train.progress import Progress
from train.step import make_train_step

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def _relora_config(**overrides):
  from configs import llama_sft

  config = llama_sft.get_config("smoke")
  config.mesh.num_devices = 1  # the test session has 8 fake devices; the smoke batch is for one
  config.update_from_flattened_dict({"lora.use_dora": True, "relora.every": 4, "relora.warmup_steps": 2,
                                     "train.log_every": 1, **overrides})
  return config


def _restore(directory: str):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(directory))


@pytest.fixture(scope="module")
def relora_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("relora"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    result = train_lib.train_and_evaluate(_relora_config(), workdir)
  return workdir, result, printed.getvalue()


def test_dora_relora_job_restarts_and_exports_the_update(relora_run):
  workdir, result, printed = relora_run
  config = _relora_config()
  assert result["after"]["eval/loss"] < result["before"]["eval/loss"]
  assert "variant: dora" in printed and "relora: restart every 4 steps (3 in 16)" in printed
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "train/relora_restarts" in r] == [4, 8, 12]
  # The jagged schedule: back to 0 after every restart, then up to the cosine over relora.warmup_steps.
  schedule = learning_rate_schedule(config.optimizer, 16, config.relora)
  logged = {r["step"]: r["train/learning_rate"] for r in rows if "train/learning_rate" in r}
  assert logged == pytest.approx({step: float(schedule(step - 1)) for step in range(1, 17)})
  assert [step for step, lr in logged.items() if lr == 0.0] == [1, 5, 9, 13]

  # The export: the last cycle's adapter on its cycle's base, and the whole update on the original base.
  adapter = result["adapter"]
  _, original = models.from_pretrained(os.path.join(workdir, "tiny_llama"), dtype=jnp.float32,
                                       param_dtype=jnp.float32)
  update = relora_lib.load_update(adapter, original)
  with open(os.path.join(adapter, "relora_update.json")) as f:
    assert json.load(f)["restarts"] == 3
  state = _restore(os.path.join(workdir, "checkpoints", "16", "state"))
  cycle_base = jlora.relora_apply(original, state["relora"]["update"])
  metadata = jlora.load_adapter_metadata(adapter)
  lora_config = metadata["lora_config"]
  assert lora_config.use_dora
  assert metadata["base_fingerprint"] == jlora.fingerprint(cycle_base) != jlora.fingerprint(original)
  assert metadata["extra"]["relora"] == {"every": 4, "restarts": 3, "update": "relora_update"}
  manifest = jlora.verify_manifest(adapter, required=True)  # the update is covered by the adapter's manifest
  assert "relora_update.json" in manifest and any(p.startswith("relora_update/") for p in manifest)
  # W_final = W0 + update serves what the last cycle's adapters compute on their base.
  model, _ = models.from_pretrained(os.path.join(workdir, "tiny_llama"))
  lora = jlora.Lora(model, lora_config)
  ids = np.arange(12, dtype=np.int32).reshape(2, 6) % 100
  adapters, _ = jlora.load_adapters(adapter, jax.eval_shape(lambda: state["trainable"]["lora"]),
                                    base_fingerprint=metadata["base_fingerprint"])
  lora.trace(cycle_base, ids)
  np.testing.assert_allclose(model.apply({"params": jlora.relora_apply(original, update)}, ids),
                             lora.apply(cycle_base, adapters, ids), rtol=2e-5, atol=2e-5)
  # What the train state carries beside the frozen base: the float32 update of the targeted kernels only.
  targets = [p.split("/") for p in lora.targets]
  flat = {tuple(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(update)[0]}
  assert sorted(flat) == sorted(tuple(t) for t in targets) and all(v.dtype == np.float32 for v in flat.values())
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(original))
  update_bytes = sum(v.nbytes for v in flat.values())
  assert update_bytes == 4 * sum(np.asarray(original["model"]["layers"][t[2]][t[3]]["kernel"]).size for t in targets)
  assert update_bytes < base_bytes
  print(f"ReLoRA update {update_bytes / 2**20:.2f} MiB vs frozen base {base_bytes / 2**20:.2f} MiB")


class _PreemptAt(Progress):
  """The loop's progress line, which sends this process SIGTERM once step ``stop_at`` is done (a preemption: the job
  saves that step and returns)."""

  stop_at = None

  def update(self, step, **kwargs):
    super().update(step, **kwargs)
    if step == _PreemptAt.stop_at:
      os.kill(os.getpid(), signal.SIGTERM)


def test_dora_relora_job_resumes_bitwise_from_a_restart_step(relora_run, tmp_path, monkeypatch):
  """Preempted right after the restart at step 8 (the checkpoint holds the restarted adapters, the pruned optimizer
  state and the update), then resumed: the final state, adapter and update equal the uninterrupted run's bit for
  bit."""
  reference, _, _ = relora_run
  workdir = str(tmp_path / "resumed")
  for built in ("tiny_llama", "data"):  # what the reference built: the same files this job would build
    shutil.copytree(os.path.join(reference, built), os.path.join(workdir, built))
  monkeypatch.setattr(train_lib, "Progress", _PreemptAt)
  monkeypatch.setattr(_PreemptAt, "stop_at", 8)
  first = train_lib.train_and_evaluate(_relora_config(), workdir)
  assert first["preempted"] and first["steps"] == 8
  monkeypatch.setattr(_PreemptAt, "stop_at", None)
  second = train_lib.train_and_evaluate(_relora_config(), workdir)
  assert not second["preempted"] and second["steps"] == 16 and second["before"] is None
  ours, theirs = (_restore(os.path.join(w, "checkpoints", "16", "state")) for w in (workdir, reference))
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  for part in ("adapters", "relora_update"):
    jax.tree.map(np.testing.assert_array_equal, _restore(os.path.join(workdir, "adapter", part)),
                 _restore(os.path.join(reference, "adapter", part)))
  losses = [{r["step"]: r["train/loss"] for r in read_metrics(w) if "train/loss" in r} for w in (workdir, reference)]
  assert losses[0] == losses[1]


# --- the other variants, through the job's pieces ---------------------------------------------------------------

LAYERS, HIDDEN, FFN, HEADS, KV_HEADS = 2, 32, 64, 4, 2


@pytest.fixture(scope="module")
def tiny_llama():
  config = models.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
  model = models.LlamaForCausalLM(config)
  ids = jax.random.randint(jax.random.key(0), (2, 2, 8), 0, 64)  # [accum, batch, seq]
  return model, model.init(jax.random.key(1), ids[0])["params"], ids


def _job_config(steps: int = 4, **lora) -> ml_collections.ConfigDict:
  from configs import llama_sft

  config = llama_sft.get_config("smoke")
  config.train.steps = steps
  config.lora.rank = lora.pop("rank", 4)
  config.update_from_flattened_dict({f"lora.{k}": v for k, v in lora.items()})
  return config


def _kernels() -> dict[str, tuple[int, int]]:
  """(fan-in, fan-out) of every targeted kernel of one layer, from the model's dimensions."""
  head_dim = HIDDEN // HEADS
  return {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV_HEADS * head_dim), "v_proj": (HIDDEN, KV_HEADS * head_dim),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, FFN), "up_proj": (HIDDEN, FFN), "down_proj": (FFN, HIDDEN)}


def _train(model, params, ids, config):
  """The job's pieces for ``config``: LoraConfig, init with base changes (jitted: only changes come out), optimizer,
  loss, train step; ``steps`` steps on ``ids``. Returns what the job's export needs."""
  lora_config = variants.lora_config(config)
  variants.check(config, lora_config)
  lora = jlora.Lora(model, lora_config)

  def init_adapters(params):
    new_params, adapters = lora.init_with_base(jax.random.key(3), params, ids[0])
    return variants.base_changes(params, new_params), {"lora": adapters}

  changes, trainable = jax.jit(init_adapters)(params)
  base = variants.overlay(params, changes)

  def loss(trainable, params, batch, rng):
    logits = lora.apply(params, trainable["lora"], batch["ids"]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:])
    return jnp.sum(losses), {"weight": jnp.asarray(losses.size, jnp.float32)}

  tx = make_optimizer(config.optimizer, config.train.steps, lora_config=lora_config)
  step = jax.jit(make_train_step(variants.wrap_loss(loss, lora_config), tx))
  state = {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key(4)}
  initial = trainable["lora"]
  metrics = []
  for _ in range(config.train.steps):
    state, m = step(state, base, {"ids": ids})
    metrics.append(m)
  return lora, changes, base, initial, state, metrics, loss


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_train_on_the_residual_and_export_plain_lora_for_the_original(tiny_llama, init):
  model, params, ids = tiny_llama
  config = _job_config(init=init)
  lora, changes, base, initial, state, metrics, _ = _train(model, params, ids, config)
  # Only the targeted kernels changed (the residual), each replacing its kernel; the init is deterministic.
  changed = {tuple(str(k.key) for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(changes)[0]}
  assert changed == {tuple(p.split("/")[:-1]) for p in lora.targets}
  _, again, _, again_initial, _, _, _ = _train(model, params, ids, _job_config(steps=0, init=init))
  jax.tree.map(np.testing.assert_array_equal, (again, again_initial), (changes, initial))
  specs = variants.change_specs(changes, jax.tree.map(lambda _: P("fsdp"), params))
  assert set(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))) == {P("fsdp")}
  assert all(bool(m["finite"]) for m in metrics)
  adapters, plain_config, export_base = variants.exported(lora, state["trainable"], state["opt_state"],
                                                          initial=initial, original=params, trained_on=base)
  assert export_base is params and plain_config.rank == 2 * config.lora.rank and not plain_config.rewrites_base
  np.testing.assert_allclose(jlora.Lora(model, plain_config).apply(params, adapters, ids[0]),
                             lora.apply(base, state["trainable"]["lora"], ids[0]), rtol=1e-4, atol=1e-4)


def test_vera_adds_only_its_replicated_projections_and_trains_its_vectors(tiny_llama):
  model, params, ids = tiny_llama
  config = _job_config(variant="vera", rank=16, projection_seed=5)
  lora, changes, base, initial, state, metrics, _ = _train(model, params, ids, config)
  assert list(changes) == [jlora.STATE_KEY] and list(changes[jlora.STATE_KEY]) == ["vera"]
  assert variants.change_specs(changes, jax.tree.map(lambda _: P("fsdp"), params)) == {
      jlora.STATE_KEY: {"vera": {"vera_a": P(), "vera_b": P()}}}
  summary = lora.summary(base, state["trainable"]["lora"])
  assert summary.variant == "vera" and summary.trainable == LAYERS * sum(out + 16 for _, out in _kernels().values())
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state["trainable"]["lora"], initial)
  assert all(jax.tree.leaves(moved))  # lambda_b and lambda_d of every kernel trained
  adapters, _, export_base = variants.exported(lora, state["trainable"], state["opt_state"], initial=None,
                                               original=params, trained_on=base)
  assert export_base is base  # the fingerprint covers the projections: the adapter loads only where they are


def _orth_regulariser(adapters) -> float:
  """AdaLoRA's R from numpy: mean over every layer's A (fan-in x r) and B (r x fan-out) of ||A^T A - I||, ||B B^T - I||."""
  norms = []
  for path, a in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    name = str(path[-1].key)
    if name in ("lora_a", "lora_b"):
      for layer in np.asarray(a, np.float64):
        gram = layer.T @ layer if name == "lora_a" else layer @ layer.T
        norms.append(np.linalg.norm(gram - np.eye(len(gram))))
  return float(np.mean(norms))


def test_adalora_prunes_by_the_config_schedule_and_exports_the_allocated_ranks(tiny_llama):
  model, params, ids = tiny_llama
  config = _job_config(steps=6, variant="adalora", rank=4, init_rank=4, target_rank=2, tinit=1, tfinal=1,
                       orth_reg_weight=0.3)
  lora, changes, base, initial, state, metrics, loss = _train(model, params, ids, config)
  assert lora.config.total_step == config.train.steps and not changes
  summary = lora.summary(base, initial)
  assert summary.trainable == LAYERS * sum(4 * (fan_in + fan_out + 1) for fan_in, fan_out in _kernels().values())
  # The logged loss is the task loss plus orth_reg_weight * R, R from the adapters the step started from.
  start = {"lora": initial}
  plain_loss, aux = loss(start, base, {"ids": ids[0]}, None)
  plain_loss2, aux2 = loss(start, base, {"ids": ids[1]}, None)
  expected = (float(plain_loss) + float(plain_loss2)) / float(aux["weight"] + aux2["weight"]) + 0.3 * \
      _orth_regulariser(initial)
  np.testing.assert_allclose(float(metrics[0]["loss"]), expected, rtol=1e-5)
  allocator = variants.allocator_state(state["opt_state"])
  assert int(allocator.budget) == config.lora.target_rank * len(_kernels()) * LAYERS
  adapters, resized, export_base = variants.exported(lora, state["trainable"], state["opt_state"], initial=None,
                                                     original=params, trained_on=base)
  assert resized.rank_pattern and max(resized.rank_pattern.values()) < 4 and export_base is base
  np.testing.assert_allclose(jlora.Lora(model, resized).apply(base, adapters, ids[0]),
                             lora.apply(base, state["trainable"]["lora"], ids[0]), rtol=1e-5, atol=1e-5)


def test_lora_and_dora_summaries_count_their_leaves(tiny_llama):
  model, params, ids = tiny_llama
  for use_dora in (False, True):
    lora = jlora.Lora(model, variants.lora_config(_job_config(use_dora=use_dora)))
    adapters = jax.eval_shape(lora.init, jax.random.key(0), params, ids[0])
    per_layer = sum(4 * (fan_in + fan_out) + use_dora * fan_out for fan_in, fan_out in _kernels().values())
    summary = lora.summary(params, adapters)
    assert summary.trainable == LAYERS * per_layer and summary.variant == ("dora" if use_dora else "lora")


def test_config_fields_and_refused_combinations():
  config = _job_config(variant="adalora", rank=6, init_rank=6, target_rank=3)
  lora_config = variants.lora_config(config)
  assert (lora_config.init_rank, lora_config.target_rank, lora_config.total_step, lora_config.beta1) == (6, 3, 4, 0.85)
  with pytest.raises(TypeError):
    config.lora.init_rank = "six"  # placeholders are typed: --config.lora.init_rank=... parses as an int
  assert variants.lora_config(_job_config()).variant == "lora"
  refused = [({"lora.use_dora": True, "lora.init": "pissa"}, "no plain-LoRA form"),
             ({"lora.variant": "vera", "relora.every": 2}, "ReLoRA restarts LoRA and DoRA"),
             ({"lora.init": "olora", "relora.every": 2}, "ReLoRA restarts LoRA and DoRA"),
             ({"relora.every": 2, "model.quantize": "nf4"}, "quantized base"),
             ({"relora.every": 4}, "would never restart"),
             ({"relora.every": 2, "relora.keep_fraction": 2.0}, "keep_fraction")]
  for overrides, message in refused:
    config = _job_config()
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
      variants.check(config, variants.lora_config(config))
