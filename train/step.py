"""The jit-compiled train and eval steps, generic over tasks.

A task's loss returns a *sum* over its examples or tokens and the *weight* (how many it summed), so
gradient accumulation over micro-batches is exact: the step divides the summed gradient by the
summed weight, identical to one big batch.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# (trainable, params, micro_batch, rng) -> (loss_sum, {"weight": ..., other sums})
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """Returns ``step(state, params, batch) -> (state, metrics)``.

  ``batch`` leaves have a leading micro-batch axis ``[accum_steps, micro_batch, ...]``. A step whose
  loss or gradient is not finite never changes the trainable tree or optimizer state
  (``metrics["finite"]`` is False); the host decides whether to skip it or stop the run.
  """

  def step(state, params, batch):
    rng, step_rng = jax.random.split(state["rng"])
    trainable = state["trainable"]
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
      grads_sum, loss_sum, weight_sum = carry
      micro_batch, index = xs
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          trainable, params, micro_batch, jax.random.fold_in(step_rng, index))
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, weight_sum + aux["weight"]), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss_sum, weight), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (batch, jnp.arange(accum)))
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss_sum / weight
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "trainable": keep(new_trainable, trainable),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": rng,
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "weight": weight}
    return new_state, metrics

  return step
