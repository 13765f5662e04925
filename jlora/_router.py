"""Routing requests to adapters: one ``AdapterBank`` slot per prompt, chosen from the base model's own features.

A request's features are the base model's final hidden states mean-pooled over its prompt tokens
(``pooled_features``: one forward of the frozen base, no adapter). A ``Router`` scores them linearly after
standardising each feature with the example prompts' statistics,

    z = (f - center) / spread,        score_k = z @ weights[:, k] + bias[k],        slot = slots[argmax_k score_k]

and both builders produce that one pytree, so a routed call is jit-friendly and the same code serves either:

* ``centroid_router`` (training-free): nearest centroid ``c_k`` of each adapter's example prompts in ``z``
  space. ``argmin_k ||z - c_k||^2 = argmax_k (2 z.c_k - ||c_k||^2)``, hence ``weights = 2 C^T`` and
  ``bias = -||c_k||^2``: a few example prompts per adapter are all it needs.
* ``linear_router`` (trained): multinomial logistic regression on the same ``z`` (softmax cross-entropy plus
  an L2 penalty on the weights, full-batch Adam from zeros, deterministic), which also separates classes
  whose centroids are close but whose difference lies in a direction other than the centroids'.

The routed slot ids go straight to ``AdapterBank.apply(..., adapter_ids=router(features))`` or
``jlora.models.generate(..., adapter_ids=router(features))``: one batched call serves requests routed to
different adapters.
"""

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._errors import JloraError


class Router(NamedTuple):
  """A linear router over standardised pooled features (a pytree; see the module docstring).

  Attributes:
    center: ``(D,)`` float32: the example prompts' mean feature.
    spread: ``(D,)`` float32: their per-feature standard deviation (floored; all ones without standardising).
    weights: ``(D, K)`` float32: one column per adapter.
    bias: ``(K,)`` float32.
    slots: ``(K,)`` int32: the bank slot of each adapter (column).

  Example:
    >>> import numpy as np, jlora
    >>> features = np.array([[0.0, 1.0], [0.2, 1.1], [3.0, -1.0], [3.1, -0.8]], np.float32)
    >>> router = jlora.centroid_router(features, labels=[4, 4, 7, 7])
    >>> router(np.array([[0.1, 0.9], [2.9, -1.2]], np.float32)).tolist()
    [4, 7]
  """

  center: jax.Array
  spread: jax.Array
  weights: jax.Array
  bias: jax.Array
  slots: jax.Array

  def scores(self, features: jax.typing.ArrayLike) -> jax.Array:
    """``(B, K)`` scores ``z @ weights + bias`` of features ``(B, D)``."""
    f_bd = jnp.asarray(features, jnp.float32)
    if f_bd.ndim != 2 or f_bd.shape[1] != self.center.shape[0]:
      raise JloraError(f"Router: features must be (batch, {self.center.shape[0]}), got {tuple(f_bd.shape)}.")
    z_bd = (f_bd - self.center[None, :]) / self.spread[None, :]
    return jnp.dot(z_bd, self.weights, precision=jax.lax.Precision.HIGHEST) + self.bias[None, :]

  def __call__(self, features: jax.typing.ArrayLike) -> jax.Array:
    """Each row's bank slot: int32 ``(B,)``, ready for ``adapter_ids=``."""
    return self.slots[jnp.argmax(self.scores(features), axis=-1)]


def pooled_features(model: nn.Module, params: Mapping, input_ids: jax.typing.ArrayLike,
                    attention_mask: jax.typing.ArrayLike | None = None) -> jax.Array:
  """The base model's final hidden states averaged over each prompt's tokens: ``sum_t m_t h_t / sum_t m_t``.

  For a ``jlora.models`` causal LM the hidden states are its body's output (after the final norm, before
  the LM head); any other model must itself return ``(B, T, D)`` hidden states. The params are used as
  given: pass the frozen base (no adapter), so every request is described the same way whatever it will be
  routed to. Jitted, keyed on ``model`` and the shapes.

  Args:
    model: the flax.linen model.
    params: its params.
    input_ids: int ``(B, T)`` prompts (left or right padding).
    attention_mask: 1 for tokens, 0 for padding ``(B, T)``; None means no padding.

  Returns:
    float32 ``(B, D)``.
  """
  ids_bt = jnp.asarray(input_ids)
  if ids_bt.ndim != 2:
    raise JloraError(f"pooled_features: input_ids must be (batch, tokens), got shape {tuple(ids_bt.shape)}.")
  mask_bt = jnp.ones(ids_bt.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if mask_bt.shape != ids_bt.shape:
    raise JloraError(f"pooled_features: attention_mask {tuple(mask_bt.shape)} != input_ids {tuple(ids_bt.shape)}.")
  return _pooled(model, params, ids_bt, mask_bt)


def _hidden_states(module: nn.Module, ids_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  body = getattr(module, "body", None)  # jlora.models causal LMs: the decoder body, without the LM head
  return body(ids_bt, mask_bt) if body is not None else module(ids_bt, mask_bt)


@functools.partial(jax.jit, static_argnums=0)
def _pooled(model: nn.Module, params: Mapping, ids_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  h_btd = model.apply({"params": params}, ids_bt, mask_bt, method=_hidden_states)
  if h_btd.ndim != 3:
    raise JloraError(f"pooled_features: {type(model).__name__} returned shape {tuple(h_btd.shape)}; it needs hidden "
                     "states (batch, tokens, features), or a jlora.models causal LM (its body's output is used).")
  m_bt1 = mask_bt.astype(jnp.float32)[:, :, None]
  return jnp.sum(h_btd.astype(jnp.float32) * m_bt1, axis=1) / jnp.maximum(jnp.sum(m_bt1, axis=1), 1.0)


def _examples(features: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(features (N, D) float64, class index (N,), slots (K,))`` of the example prompts, checked."""
  f_nd = np.asarray(jax.device_get(features), np.float64)
  slot_n = np.asarray(jax.device_get(labels))
  if f_nd.ndim != 2 or slot_n.shape != (f_nd.shape[0],) or not np.issubdtype(slot_n.dtype, np.integer):
    raise JloraError(f"{what}: features must be (examples, D) and labels ints (examples,) (each example's bank "
                     f"slot), got {f_nd.shape} and {slot_n.dtype} {slot_n.shape}.")
  if not np.isfinite(f_nd).all():
    raise JloraError(f"{what}: the example features are not all finite.")
  slots, class_n = np.unique(slot_n, return_inverse=True)
  if slots[0] < 0:
    raise JloraError(f"{what}: labels are bank slots (>= 0), got {slots[0]}.")
  if len(slots) < 2:
    raise JloraError(f"{what}: examples of at least two adapters are needed to route, got slot(s) {slots.tolist()}.")
  return f_nd, class_n, slots


def _standardiser(f_nd: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
  center = f_nd.mean(axis=0)
  if not standardize:
    return center, np.ones_like(center)
  std = f_nd.std(axis=0)
  # A feature constant over the examples carries no routing signal; dividing by ~0 would only amplify noise.
  return center, np.maximum(std, 1e-6 * max(float(std.max()), 1e-30))


def _router(center, spread, weights, bias, slots) -> Router:
  return Router(jnp.asarray(center, jnp.float32), jnp.asarray(spread, jnp.float32), jnp.asarray(weights, jnp.float32),
                jnp.asarray(bias, jnp.float32), jnp.asarray(slots, jnp.int32))


def centroid_router(features: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *, standardize: bool = True
                    ) -> Router:
  """The training-free router: nearest centroid of each adapter's example features.

  ``slot(f) = argmin_k ||z - c_k||^2`` with ``z = (f - center) / spread`` and ``c_k`` the mean ``z`` of
  adapter ``k``'s examples, stored in linear form (``weights = 2 C^T``, ``bias = -||c_k||^2``).

  Args:
    features: ``(N, D)`` pooled features of example prompts (``pooled_features``), a few per adapter.
    labels: int ``(N,)``: each example's bank slot.
    standardize: divide each feature by its standard deviation over the examples (else only centre).

  Returns:
    A ``Router`` over the slots present in ``labels``.
  """
  f_nd, class_n, slots = _examples(features, labels, "centroid_router")
  center, spread = _standardiser(f_nd, standardize)
  z_nd = (f_nd - center) / spread
  c_kd = np.stack([z_nd[class_n == k].mean(axis=0) for k in range(len(slots))])
  return _router(center, spread, 2.0 * c_kd.T, -np.sum(c_kd**2, axis=1), slots)


def linear_router(features: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *, steps: int = 500,
                  learning_rate: float = 0.05, l2: float = 1e-3, standardize: bool = True) -> Router:
  """A trained linear router: softmax regression from standardised features to the examples' slots.

  Minimises ``mean_n CE(z_n @ W + b, k_n) + (l2 / 2) ||W||^2`` with full-batch Adam (``optax.adam``) from
  zeros for ``steps`` steps, one jitted ``lax.scan``: deterministic, no rng.

  Args:
    features: ``(N, D)`` pooled features of the training prompts.
    labels: int ``(N,)``: each prompt's bank slot.
    steps: optimizer steps.
    learning_rate: Adam's learning rate.
    l2: weight penalty (keeps the scores finite on separable data).
    standardize: as in ``centroid_router``.

  Returns:
    A ``Router`` over the slots present in ``labels``.
  """
  f_nd, class_n, slots = _examples(features, labels, "linear_router")
  if not isinstance(steps, int) or steps < 1:
    raise JloraError(f"linear_router: steps must be an int >= 1, got {steps!r}.")
  center, spread = _standardiser(f_nd, standardize)
  z_nd = jnp.asarray((f_nd - center) / spread, jnp.float32)
  weights, bias = _fit(z_nd, jnp.asarray(class_n, jnp.int32), len(slots), steps, float(learning_rate), float(l2))
  return _router(center, spread, weights, bias, slots)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _fit(z_nd: jax.Array, class_n: jax.Array, n_classes: int, steps: int, learning_rate: float, l2: float
         ) -> tuple[jax.Array, jax.Array]:
  tx = optax.adam(learning_rate)
  params = {"weights": jnp.zeros((z_nd.shape[1], n_classes), jnp.float32), "bias": jnp.zeros((n_classes,), jnp.float32)}

  def loss(p):
    logits_nk = jnp.dot(z_nd, p["weights"], precision=jax.lax.Precision.HIGHEST) + p["bias"][None, :]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_nk, class_n).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(p["weights"]))

  def step(carry, _):
    p, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params["weights"], params["bias"]
