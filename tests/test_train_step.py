"""The generic train step: exact gradient accumulation and no update from a non-finite step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.step import make_train_step


def _loss(trainable, params, batch, rng):
  pred = batch["x"] @ (params["w"] + trainable["delta"])
  return jnp.sum(jnp.square(pred - batch["y"]) * batch["mask"][:, None]), {"weight": jnp.sum(batch["mask"])}


def _state(tx):
  trainable = {"delta": jnp.zeros((3, 2))}
  return {"trainable": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.PRNGKey(0)}


def _data(n=8):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.normal(size=(n, 2)).astype(np.float32),
          "mask": np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32)[:n]}


def test_accumulation_equals_one_big_batch():
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(_loss, tx))
  params = {"w": jnp.ones((3, 2))}
  data = _data()
  one = {k: v[None] for k, v in data.items()}                  # [1, 8, ...]
  four = {k: v.reshape((4, 2) + v.shape[1:]) for k, v in data.items()}  # [4, 2, ...], uneven masks per micro-batch
  s1, m1 = step(_state(tx), params, one)
  s4, m4 = step(_state(tx), params, four)
  chex.assert_trees_all_close(s1["trainable"], s4["trainable"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  # and against the hand-computed masked-mean gradient
  x, y, mask = data["x"], data["y"], data["mask"]
  grad = 2 * x.T @ ((x @ np.ones((3, 2)) - y) * mask[:, None]) / mask.sum()
  np.testing.assert_allclose(s1["trainable"]["delta"], -0.1 * grad, rtol=1e-5, atol=1e-6)
  assert int(s1["step"]) == 1 and bool(m1["finite"])


def test_nonfinite_step_changes_nothing():
  tx = optax.adam(0.1)
  step = jax.jit(make_train_step(_loss, tx))
  params = {"w": jnp.ones((3, 2))}
  data = {k: v[None] for k, v in _data().items()}
  data["y"] = data["y"].copy()
  data["y"][0, 0, 0] = np.nan
  state = _state(tx)
  new, metrics = step(state, params, data)
  assert not bool(metrics["finite"])
  chex.assert_trees_all_equal(new["trainable"], state["trainable"])
  chex.assert_trees_all_equal(new["opt_state"], state["opt_state"])
  assert int(new["step"]) == 1  # the data was consumed; the step counter moves on
