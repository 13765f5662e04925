"""jlora's ReLoRA functions (jlora/_relora.py): merge-and-restart reaches rank > r, restarts change no output, the
optimizer-state pruning and the jagged schedule against numpy references, and what ReLoRA refuses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from _cases import ScannedStack

import jlora
from jlora import quant

RANK = 2


def _numerical_rank(matrix) -> int:
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  return int(np.sum(s > 1e-4 * s[0]))


def _prune_apart(opt_state, keep_fraction: float = 0.01):
  """ReLoRA's reference pruning (torch's magnitude_pruning on exp_avg and exp_avg_sq): each array on its own."""
  adam, schedule = opt_state

  def prune(x):
    x = np.asarray(x)
    return jnp.asarray(np.where(np.abs(x) > np.quantile(np.abs(x), 1.0 - keep_fraction), x, 0.0))

  return adam._replace(mu=jax.tree.map(prune, adam.mu), nu=jax.tree.map(prune, adam.nu)), schedule


def _regression(restart: bool, cycles: int = 3, steps: int = 20, prune=None):
  """LoRA r=2 fits a full-rank linear map for ``cycles * steps`` Adam steps on ReLoRA's jagged schedule, restarting
  between cycles or not; returns the whole ``W_final - W_0`` (``relora_fold`` of the last adapters)."""
  model = nn.Dense(12, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (64, 16))
  params = model.init(jax.random.key(1), x)["params"]
  target = x @ jax.random.normal(jax.random.key(2), (16, 12))
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=RANK, alpha=2.0))
  adapters = lora.init(jax.random.key(3), params, x)
  update = jlora.relora_init(lora, params)
  tx = optax.adam(jlora.relora_schedule(optax.constant_schedule(3e-2), every=steps, warmup_steps=5))
  opt_state = tx.init(adapters)

  @jax.jit
  def step(adapters, opt_state, base):
    grads = jax.grad(lambda a: jnp.mean(jnp.square(lora.apply(base, a, x) - target)))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  for cycle in range(cycles):
    base = jlora.relora_apply(params, update)
    for _ in range(steps):
      adapters, opt_state = step(adapters, opt_state, base)
    if restart and cycle < cycles - 1:
      update, adapters = jlora.relora_restart(lora, params, update, adapters, jax.random.key(100 + cycle))
      opt_state = prune(opt_state) if prune else jlora.relora_prune(lora, adapters, opt_state, keep_fraction=0.01)
  return jlora.relora_fold(lora, params, update, adapters)["kernel"]


def test_restarts_reach_a_rank_above_r():
  """After k restarts the accumulated update W_final - W_0 has rank > r; the same steps without restarts stay at r.

  Pruning Adam's m and v apart (ReLoRA's code) leaves a kept m over a zeroed v where A, whose gradient is zero
  while B = 0 right after a restart, then steps by m / eps: the update explodes. relora_prune keeps them together.
  """
  restarted = _regression(restart=True)
  assert RANK < _numerical_rank(restarted) <= 3 * RANK, _numerical_rank(restarted)
  assert _numerical_rank(_regression(restart=False)) <= RANK
  apart = _regression(restart=True, cycles=2, prune=_prune_apart)
  assert np.linalg.norm(apart, 2) > 20 * np.linalg.norm(restarted, 2)  # 1300 vs 5.6 here


def _dense_setup(use_dora: bool, param_dtype=jnp.float32):
  model = nn.Dense(6, param_dtype=param_dtype)
  x = jax.random.normal(jax.random.key(0), (3, 5))
  params = model.init(jax.random.key(1), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=RANK, alpha=4.0, use_dora=use_dora))
  adapters = lora.init(jax.random.key(2), params, x)
  rng = np.random.default_rng(0)
  trained = jax.tree.map(lambda v: v + jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype), adapters)
  update = {"kernel": jnp.asarray(0.05 * rng.standard_normal(params["kernel"].shape), jnp.float32)}
  return model, x, params, lora, trained, update


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_restart_folds_the_adapters_and_changes_no_output(use_dora):
  model, x, params, lora, trained, update = _dense_setup(use_dora)
  base = jlora.relora_apply(params, update)
  before = lora.apply(base, trained, x)
  new_update, fresh = jlora.relora_restart(lora, params, update, trained, jax.random.key(7))
  new_base = jlora.relora_apply(params, new_update)
  # The update is the cycle's merge, kept apart from the base (which is untouched).
  np.testing.assert_allclose(new_base["kernel"], lora.merge(base, trained)["kernel"], rtol=1e-6, atol=1e-6)
  if not use_dora:  # numpy: W0 + u + s * A @ B
    a, b = (np.asarray(trained["kernel"][k], np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(new_update["kernel"], np.asarray(update["kernel"]) + 2.0 * a @ b, rtol=1e-5, atol=1e-6)
  assert new_update["kernel"].dtype == jnp.float32 and set(new_update) == {"kernel"}
  np.testing.assert_array_equal(np.asarray(new_base["bias"]), np.asarray(params["bias"]))
  # Fresh adapters: B = 0, A drawn from the new key as Lora.init draws it; the output is the merged model's.
  np.testing.assert_array_equal(fresh["kernel"]["lora_b"], 0.0)
  again = lora.init(jax.random.key(7), new_base, x)
  np.testing.assert_array_equal(fresh["kernel"]["lora_a"], again["kernel"]["lora_a"])
  assert not np.allclose(fresh["kernel"]["lora_a"], trained["kernel"]["lora_a"])
  if use_dora:  # the magnitude restarts at the new kernel's column norms
    np.testing.assert_allclose(fresh["kernel"]["lora_magnitude"], np.linalg.norm(new_base["kernel"], axis=0),
                               rtol=1e-6)
  np.testing.assert_allclose(lora.apply(new_base, fresh, x), before, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.apply({"params": new_base}, x), before, rtol=1e-5, atol=1e-5)


def test_bfloat16_base_keeps_a_float32_update_and_casts_once():
  _, _, params, lora, trained, update = _dense_setup(False, param_dtype=jnp.bfloat16)
  new_update, _ = jlora.relora_restart(lora, params, update, trained, jax.random.key(7))
  assert new_update["kernel"].dtype == jnp.float32
  applied = jlora.relora_apply(params, new_update)
  expected = (np.asarray(params["kernel"], np.float32) + np.asarray(new_update["kernel"])).astype(ml_dtypes.bfloat16)
  assert applied["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(applied["kernel"]), expected)


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def test_prune_keeps_the_largest_moments_per_layer_against_numpy():
  """Each adapter leaf's Adam mu and nu mark the entries above their 90% quantile, each stacked layer alone (numpy's
  quantile: torch.quantile's linear interpolation); an entry marked in either keeps both. A head trained beside the
  adapters, the step count and the clipping state are untouched; keep_fraction=0 resets."""
  model = ScannedStack()
  x = jax.random.normal(jax.random.key(0), (4, 4))
  params = model.init(jax.random.key(1), x)["params"]
  lora = jlora.Lora(model, jlora.LoraConfig(targets=r".*/kernel", rank=RANK, alpha=4.0))
  trainable = {"lora": lora.init(jax.random.key(2), params, x), "head": {"w": jnp.zeros((4, 3))}}
  # The job's optimizer with LoRA+: chain(clip, multi_transform(adam per group)).
  for tx in (optax.chain(optax.clip_by_global_norm(1.0), jlora.lora_plus(optax.adam, 1e-2, ratio=4.0, others="train")),):
    opt_state = tx.init(trainable)
    for i in range(3):  # moments with many distinct values
      grads = jax.tree.map(lambda v, i=i: jax.random.normal(jax.random.key(10 + i), v.shape), trainable)
      _, opt_state = jax.jit(tx.update)(grads, opt_state, trainable)
    prune = jax.jit(jlora.relora_prune, static_argnums=(0, 3))
    flat = [(_names(path), np.asarray(v)) for path, v in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    moments = {}  # adapter leaf path -> indices of its moment arrays
    for i, (names, value) in enumerate(flat):
      if "lora" in names and names[-1].startswith("lora_") and value.ndim:
        moments.setdefault(names[names.index("lora"):], []).append(i)
    assert len(moments) == 4 and all(len(v) == 2 for v in moments.values())  # lora_a/b of fc and head; mu, nu
    expected = [value for _, value in flat]
    for leaf, indices in moments.items():
      lead = 1 if "layers" in leaf else 0  # the scanned kernel's leading layer axis
      keep = False
      for i in indices:
        magnitude = np.abs(flat[i][1].astype(np.float64)).reshape(flat[i][1].shape[:lead] + (-1,))
        keep = keep | (magnitude > np.quantile(magnitude, 0.9, axis=-1, keepdims=True)).reshape(flat[i][1].shape)
      assert 0 < keep.sum() <= 0.2 * keep.size + 4  # ties aside, at most 10% from each moment
      for i in indices:
        expected[i] = np.where(keep, flat[i][1], 0.0)
    for got, want in zip(jax.tree.leaves(prune(lora, trainable["lora"], opt_state, 0.1)), expected, strict=True):
      np.testing.assert_array_equal(np.asarray(got), want)
    reset = jax.tree.leaves(prune(lora, trainable["lora"], opt_state, 0.0))
    moment_indices = {i for indices in moments.values() for i in indices}
    for i, ((_, value), got) in enumerate(zip(flat, reset, strict=True)):
      np.testing.assert_array_equal(np.asarray(got), np.zeros_like(value) if i in moment_indices else value)
  with pytest.raises(jlora.JloraError, match="no optimizer state of the adapter leaves"):
    jlora.relora_prune(lora, trainable["lora"], optax.sgd(0.1).init(trainable))
  with pytest.raises(jlora.JloraError, match="keep_fraction"):
    jlora.relora_prune(lora, trainable["lora"], opt_state, keep_fraction=1.5)


def test_jagged_schedule_against_the_formula():
  base = optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=3, decay_steps=40, end_value=1e-4)
  jagged = jlora.relora_schedule(base, every=10, warmup_steps=4)
  for t in range(40):
    since = t % 10
    factor = since / 4 if t >= 10 and since < 4 else 1.0
    np.testing.assert_allclose(float(jagged(t)), float(base(t)) * factor, rtol=1e-6)
  assert float(jagged(10)) == 0.0 and float(jagged(9)) > 0.0
  assert float(jlora.relora_schedule(base, every=10, warmup_steps=0)(10)) == float(base(10))


def test_refuses_what_it_cannot_restart():
  model = nn.Dense(6)
  x = jnp.ones((2, 32))
  params = model.init(jax.random.key(0), x)["params"]
  for config in (jlora.LoraConfig(targets="kernel", variant="vera", rank=2),
                 jlora.LoraConfig(targets="kernel", rank=2, init="pissa"),
                 jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=4, target_rank=2, rank=4,
                                  total_step=10)):
    with pytest.raises(jlora.JloraError, match="ReLoRA restarts LoRA and DoRA adapters with a random init"):
      jlora.relora_restart(jlora.Lora(model, config), params, {}, {}, jax.random.key(2))
  lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=2))
  lora.trace(params, x)
  with pytest.raises(jlora.JloraError, match="quantized"):
    jlora.relora_init(lora, quant.quantize(params, "kernel", block_size=32))
  with pytest.raises(jlora.JloraError, match="is \\(3, 6\\), the kernel \\(32, 6\\)"):
    jlora.relora_apply(params, {"kernel": jnp.zeros((3, 6))})
  with pytest.raises(jlora.JloraError, match="which params do not have"):
    jlora.relora_apply(params, {"other": jnp.zeros((3, 6))})
