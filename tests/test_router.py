"""jlora.Router: routing against a numpy nearest-centroid reference, the trained router on synthetic classes, pooled
features against transformers' hidden states, and routed bank calls (forward and generate) against every row run
alone with its routed adapter. The routing demo (``tools.route_demo``) runs end to end on a tiny model.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multi_adapter import base
from test_safe_load import random_like

import jlora
from jlora import models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TARGETS = r".*/(q_proj|v_proj|up_proj)/kernel"


def _blobs(seed: int, n_per_class: int, slots: list[int], dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian classes with different per-feature scales (so standardising matters) around random means of different
  norms (so the centroids' norms matter)."""
  rng = np.random.default_rng(seed)
  means = np.random.default_rng(100).normal(0, 1.0, (len(slots), dim)) * np.asarray([0.2, 1.0, 2.0])[:, None]
  scales = np.geomspace(0.1, 30.0, dim)
  features = np.concatenate([(means[k] + rng.normal(0, 1.0, (n_per_class, dim))) * scales for k in range(len(slots))])
  return features.astype(np.float32), np.repeat(slots, n_per_class).astype(np.int32)


def _numpy_nearest_centroid(train_f, train_slot, query_f):
  mean, std = train_f.astype(np.float64).mean(0), train_f.astype(np.float64).std(0)
  z, q = (train_f - mean) / std, (query_f - mean) / std
  slots = sorted(set(train_slot.tolist()))
  centroids = np.stack([z[train_slot == s].mean(0) for s in slots])
  distances = ((q[:, None, :] - centroids[None]) ** 2).sum(-1)
  return np.asarray(slots)[distances.argmin(1)]


def test_centroid_router_is_nearest_centroid():
  slots = [5, 0, 2]
  train_f, train_slot = _blobs(0, 4, slots)  # a few example prompts per adapter
  query_f, query_slot = _blobs(1, 40, slots)
  router = jlora.centroid_router(train_f, train_slot)
  expected = _numpy_nearest_centroid(train_f, train_slot, query_f)
  np.testing.assert_array_equal(np.asarray(router(query_f)), expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda r, f: r(f))(router, query_f)), expected)
  assert np.mean(expected == query_slot) > 0.8  # the reference itself routes: the comparison is not vacuous
  assert router(query_f).dtype == jnp.int32


def test_linear_router_separates_classes_centroids_cannot():
  """Three classes that differ only in ``f0 - f1`` while ``f0`` and ``f1`` share a large common noise: linearly
  separable, but their centroids are closer than the noise, so nearest centroid fails where the trained router
  does not."""
  def data(seed, n):
    rng = np.random.default_rng(seed)
    cls = np.arange(3 * n) % 3
    common = rng.normal(0, 5.0, 3 * n)
    f = np.stack([common + 2.0 * cls + rng.normal(0, 0.05, 3 * n), common] +
                 [rng.normal(0, 1.0, 3 * n) for _ in range(4)], axis=1)
    return f.astype(np.float32), np.asarray([7, 3, 1])[cls].astype(np.int32)

  train_f, train_slot = data(0, 60)
  test_f, test_slot = data(1, 100)
  trained = jlora.linear_router(train_f, train_slot)
  np.testing.assert_array_equal(np.asarray(trained(train_f)), train_slot)
  np.testing.assert_array_equal(np.asarray(trained(test_f)), test_slot)
  assert np.mean(np.asarray(jlora.centroid_router(train_f, train_slot)(test_f)) == test_slot) < 0.7


def test_router_refuses_unusable_examples():
  f = np.zeros((4, 3), np.float32)
  with pytest.raises(jlora.JloraError, match="at least two adapters"):
    jlora.centroid_router(f, [1, 1, 1, 1])
  with pytest.raises(jlora.JloraError, match="bank slots"):
    jlora.linear_router(f, [-1, 0, 0, 1])
  with pytest.raises(jlora.JloraError, match="labels ints"):
    jlora.centroid_router(f, [0.0, 1.0, 0.0, 1.0])
  router = jlora.centroid_router(np.eye(4, 3, dtype=np.float32), [0, 1, 0, 1])
  with pytest.raises(jlora.JloraError, match=r"features must be \(batch, 3\)"):
    router(np.zeros((2, 4), np.float32))


def test_pooled_features_are_transformers_hidden_states_averaged():
  import torch

  hf, model, params = base()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 128, size=(3, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 4:], mask[2, 2:] = 0, 0  # right padding: transformers' default positions are then the same
  with torch.no_grad():
    hidden = hf.model(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask)).last_hidden_state.double().numpy()
  expected = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
  got = np.asarray(jlora.pooled_features(model, params, ids, mask))
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def _task_prompts(seed: int, n_per_task: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded prompts of three 'tasks' and each prompt's task (0, 1, 2): a task's prompts start with its own
  three instruction tokens, then random content tokens from one shared range (as requests phrased per task)."""
  rng = np.random.default_rng(seed)
  instructions = [[3, 9, 14], [60, 61, 62], [101, 7, 88]]
  task = np.arange(3 * n_per_task) % 3
  ids = np.zeros((len(task), 10), np.int32)
  mask = np.zeros_like(ids)
  for row, t in enumerate(task):
    length = int(rng.integers(3, 8))
    ids[row, 10 - length - 3:] = np.concatenate([instructions[t], rng.integers(1, 128, size=length)])
    mask[row, 10 - length - 3:] = 1
  return ids, mask, task


@pytest.fixture(scope="module")
def routed():
  """Three adapters (random non-zero factors, one config: one compiled single-adapter program serves all three) in
  slots 3, 0, 2 of a bank, and both routers built from the base model's pooled features of four example prompts per
  task."""
  _, model, params = base()
  ids, _, _ = _task_prompts(0, 1)
  bank = jlora.AdapterBank(model, params, ids, targets=TARGETS, slots=4, max_rank=4)
  state, singles, slot_of_task = bank.init(), {}, [3, 0, 2]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=TARGETS, rank=3, alpha=6.0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.AdapterNormWarning)
    for task, slot in enumerate(slot_of_task):
      adapters = random_like(jax.eval_shape(lora.init, jax.random.key(task), params, ids), seed=task, scale=0.05)
      state = bank.insert(state, slot, adapters, lora.config)
      singles[slot] = adapters
  ex_ids, ex_mask, ex_task = _task_prompts(1, 4)
  features = jlora.pooled_features(model, params, ex_ids, ex_mask)
  labels = np.asarray(slot_of_task)[ex_task]
  routers = {"centroid": jlora.centroid_router(features, labels), "linear": jlora.linear_router(features, labels)}
  return model, params, bank, state, lora, singles, routers, slot_of_task


@pytest.mark.parametrize("kind", ["centroid", "linear"])
def test_routed_bank_call_equals_each_row_alone(routed, kind):
  model, params, bank, state, lora, singles, routers, slot_of_task = routed
  ids, mask, task = _task_prompts(2, 3)
  slots = np.asarray(routers[kind](jlora.pooled_features(model, params, ids, mask)))
  np.testing.assert_array_equal(slots, np.asarray(slot_of_task)[task])  # the tiny model's tasks are easy to tell
  got = np.asarray(jax.jit(bank.apply)(params, state, ids, mask, adapter_ids=slots))
  single = jax.jit(lora.apply)
  for slot, adapters in singles.items():  # rows do not interact: each adapter over the batch, its routed rows kept
    rows = np.flatnonzero(slots == slot)
    alone = np.asarray(single(params, adapters, ids, mask))
    keep = mask[rows].astype(bool)
    np.testing.assert_allclose(got[rows][keep], alone[rows][keep], rtol=0, atol=2e-5)


def test_routed_generate_equals_each_row_alone(routed):
  model, params, bank, state, lora, singles, routers, slot_of_task = routed
  ids, mask, task = _task_prompts(3, 2)
  slots = np.asarray(routers["linear"](jlora.pooled_features(model, params, ids, mask)))
  np.testing.assert_array_equal(slots, np.asarray(slot_of_task)[task])
  got = np.asarray(models.generate(model, bank.inject(params, state), ids, mask, max_new_tokens=4,
                                   apply_fn=bank.apply_fn(), adapter_ids=slots))
  for slot, adapters in singles.items():
    rows = np.flatnonzero(slots == slot)
    alone = models.generate(model, lora.inject(params, adapters), ids, mask, max_new_tokens=4,
                            apply_fn=lora.apply_fn())
    np.testing.assert_array_equal(got[rows], np.asarray(alone)[rows])


def test_route_demo_end_to_end_on_a_tiny_model(tmp_path):
  """``tools.route_demo`` on a tiny random model with SmolLM2's tokenizer: the code path of the README's figures.
  Requests routed to the same slot as the oracle get the oracle's answer (rows do not interact in a mixed batch)."""
  import json

  from tools import route_demo
  from train.tasks import stdlib_summaries

  settings = route_demo.TINY
  model, params, tokenizer, template = route_demo.load_model(settings, str(tmp_path))
  result = route_demo.run(model, params, tokenizer, template, stdlib_summaries.examples(), settings, str(tmp_path))
  assert result == json.loads((tmp_path / "route_demo.json").read_text())
  assert len(result["losses"]) == settings.steps and all(np.isfinite(result["losses"]))
  for kind, routing in result["routing"].items():
    assert np.sum(routing["confusion"]) == result["held_out"]["routing"] == 3 * settings.routing_prompts, kind
    assert routing["accuracy"] == pytest.approx(np.trace(routing["confusion"]) / np.sum(routing["confusion"]))
  assert set(result["quality"]) == set(route_demo.TASKS)
  rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
  assert len(rows) == result["held_out"]["quality"] == 3 * settings.quality_prompts
  for row in rows:
    assert row["oracle"]["slot"] == route_demo.TASKS.index(row["task"]) and row["base"]["slot"] == -1
    for kind in ("centroid", "linear"):
      if row[kind]["slot"] == row["oracle"]["slot"]:
        assert row[kind]["answer"] == row["oracle"]["answer"], (kind, row)
  assert "| centroid |" in route_demo.tables(result)


def test_param_names_of_a_signature():
  from tools.route_demo import param_names

  assert param_names("(obj, /, *args, key=None, **kwargs)") == "obj, *args, key, **kwargs"
  assert param_names("()") is None and param_names("(x=<object object>)") is None
