"""AdaLoRA's training-time parts: the rank allocator (an optax transformation), the orthogonal regulariser, and
the adapter sliced to its allocated ranks.

The adapter itself is ``jlora.variants.ADALORA`` (``LoraConfig(variant="adalora", ...)``). PEFT trains it with
``loss + orth_reg_weight * R`` and, after every optimizer step, ``RankAllocator.update_and_allocate``; jlora
offers the same as pure functions:

* ``adalora_orth_loss(adapters, config)``: ``orth_reg_weight * R`` to add to the loss;
* ``adalora_allocator(tx, config)``: ``tx`` followed by the allocator, one ``optax.GradientTransformation``;
* ``adalora_resize(adapters, masks, config)``: the final adapter at its allocated ranks and its config.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._errors import JloraError

_LEAVES = ("lora_a", "lora_e", "lora_b")
_HIGHEST = jax.lax.Precision.HIGHEST


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _nodes(tree: Any, what: str) -> tuple[dict[str, dict[str, int]], list, Any]:
  """``({node path: {leaf name: index into the flat leaves}}, flat leaves, treedef)`` of a tree's AdaLoRA nodes.

  A node is the parent of ``lora_a``, ``lora_e`` and ``lora_b`` leaves (a kernel's adapter in a ``jlora.Lora``
  tree, an adapted module in an nnx state); its path is '/'-joined, e.g. ``layers/attn/q_proj/kernel``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  nodes: dict[str, dict[str, int]] = {}
  for i, (path, _) in enumerate(flat):
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      path = path[:-1]  # an nnx Variable's value (nnx.state(model, jlora.nnx.LoraParam))
    name = _key_name(path[-1]) if path else ""
    if name in _LEAVES:
      nodes.setdefault("/".join(_key_name(k) for k in path[:-1]), {})[name] = i
  broken = {p: sorted(n) for p, n in nodes.items() if set(n) != set(_LEAVES)}
  if broken:
    raise JloraError(f"{what}: AdaLoRA adapters have lora_a, lora_e and lora_b; these nodes do not: {broken}.")
  if not nodes:
    raise JloraError(f"{what}: the tree has no AdaLoRA adapters (nodes with lora_a, lora_e, lora_b); make them with "
                     "LoraConfig(variant='adalora', ...).")
  return nodes, [leaf for _, leaf in flat], treedef


def _check_config(config, what: str) -> None:
  if getattr(config, "variant", None) != "adalora":
    raise JloraError(f"{what} needs the LoraConfig of the AdaLoRA adapters (variant='adalora'), got "
                     f"variant={getattr(config, 'variant', None)!r}.")


def _safe_norm(x: jax.Array, axes: tuple[int, int]) -> jax.Array:
  """Frobenius norm over ``axes`` whose gradient at 0 is 0 (not NaN)."""
  squared = jnp.sum(jnp.square(x), axis=axes)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def adalora_orth_loss(adapters: Any, config) -> jax.Array:
  """AdaLoRA's orthogonal regulariser, weighted: ``orth_reg_weight * mean(||P^T P - I||_F, ||Q Q^T - I||_F)``.

  The mean runs over every right factor ``P`` (``lora_a`` as a ``(fan_in, r)`` matrix) and every left factor
  ``Q`` (``lora_b`` as ``(r, fan_out)``) of the tree, each stacked layer and kernel-batch slice one matrix, as
  PEFT's ``AdaLoraModel.forward`` adds it to the loss (``p @ p.T`` of ``lora_A``, ``p.T @ p`` of ``lora_B``).

  Args:
    adapters: a tree holding AdaLoRA adapters (``lora_a``, ``lora_e``, ``lora_b``); other leaves are ignored.
    config: their ``LoraConfig(variant="adalora", ...)`` (its ``orth_reg_weight``).

  Returns:
    A float32 scalar, to add to the training loss.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> config = jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=2, target_rank=1, total_step=10)
    >>> adapters = {"kernel": {"lora_a": jnp.eye(3, 2), "lora_e": jnp.zeros(2), "lora_b": jnp.eye(2, 4)}}
    >>> float(jlora.adalora_orth_loss(adapters, config))  # orthonormal factors
    0.0
  """
  _check_config(config, "adalora_orth_loss")
  nodes, flat, _ = _nodes(adapters, "adalora_orth_loss")
  total, count = jnp.zeros((), jnp.float32), 0
  for leaves in nodes.values():
    a = jnp.asarray(flat[leaves["lora_a"]], jnp.float32)
    b = jnp.asarray(flat[leaves["lora_b"]], jnp.float32)
    lead = flat[leaves["lora_e"]].shape[:-1]
    rank = a.shape[-1]
    a = a.reshape(lead + (-1, rank))
    b = b.reshape(lead + (rank, -1))
    eye = jnp.eye(rank, dtype=jnp.float32).reshape((1,) * len(lead) + (rank, rank))
    gram_a = jnp.einsum("...ir,...iq->...rq", a, a, precision=_HIGHEST)
    gram_b = jnp.einsum("...ro,...qo->...rq", b, b, precision=_HIGHEST)
    total = total + jnp.sum(_safe_norm(gram_a - eye, (-2, -1))) + jnp.sum(_safe_norm(gram_b - eye, (-2, -1)))
    count += 2 * int(np.prod(lead, dtype=np.int64))
  return config.orth_reg_weight * total / count


class AdaLoraAllocatorState(NamedTuple):
  """The state of ``adalora_allocator``.

  Attributes:
    inner: the wrapped optimizer's state.
    count: the step the next update is (PEFT's ``global_step``, from 0).
    exp_avg_ipt: ``{node path: {leaf: EMA of |p * g|}}``, the smoothed sensitivity of every AdaLoRA leaf.
    exp_avg_unc: ``{node path: {leaf: EMA of |ipt - exp_avg_ipt|}}``, its uncertainty.
    masks: ``{node path: bool array}`` shaped like each ``lora_e``: the triplets the last allocation kept (PEFT's
      ``rank_pattern``); all True before the first one. ``adalora_resize`` takes it.
    budget: the rank budget (kept triplets over all adapters) of the last update's schedule.
  """

  inner: optax.OptState
  count: jax.Array
  exp_avg_ipt: dict
  exp_avg_unc: dict
  masks: dict
  budget: jax.Array


def budget_table(init_budget: int, target_budget: int, config) -> np.ndarray:
  """PEFT's cubic budget for the steps ``tinit + 1 .. total_step - tfinal``, computed as PEFT does (float64).

  ``budget(t) = int((init - target) * (1 - (t - tinit) / (total_step - tfinal - tinit)) ** 3 + target)``;
  a table, so that jitted code truncates exactly where PEFT's float64 arithmetic does.
  """
  span = config.total_step - config.tfinal - config.tinit
  steps = range(config.tinit + 1, config.total_step - config.tfinal + 1)
  return np.array([int((init_budget - target_budget) * (1 - (t - config.tinit) / span) ** 3 + target_budget)
                   for t in steps], np.int32)


def adalora_allocator(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """AdaLoRA's rank allocator after the optimizer ``tx``: PEFT's ``update_and_allocate`` as one optax transformation.

  At the ``t``-th update (``t`` from 0, PEFT's ``global_step``), with ``p`` the AdaLoRA leaves after ``tx``'s step
  and ``g`` their gradients (so ``params`` must be passed to ``update``), as PEFT's ``RankAllocator``:

  * while ``t < total_step - tfinal``: sensitivity ``I = |p * g|``, ``Ī = beta1 Ī + (1 - beta1) I``, uncertainty
    ``Ū = beta2 Ū + (1 - beta2) |I - Ī|``;
  * each triplet ``i`` of a kernel scores ``S_i = s(E_i) + (mean_in s(A_:i) + mean_out s(B_i:))`` with
    ``s = Ī * Ū``;
  * the budget (kept triplets over all kernels) is ``b_0 = sum of ranks`` until ``tinit``, then falls as a cubic to
    ``b_T = target_rank * number of kernels`` at ``total_step - tfinal``;
  * every ``delta_t`` steps in between, and at ``total_step - tfinal``, the triplets scoring at or below the
    ``(b_0 - budget)``-th smallest score get ``E = 0`` (their ``A`` and ``B`` stay); the masks of the final
    allocation then zero ``E`` after every later step, and the EMAs are reset.

  Stacked layers and kernel-batch slices are kernels of their own, as PEFT's per-layer modules are. Leaves other
  than AdaLoRA's (in a combined tree) get ``tx``'s updates unchanged.

  Args:
    tx: the optimizer, e.g. ``optax.adamw(1e-3)`` (or ``jlora.adapters_only(...)`` of a combined tree).
    config: the adapters' ``LoraConfig(variant="adalora", ...)``: ``target_rank``, ``tinit``, ``tfinal``,
      ``delta_t``, ``beta1``, ``beta2``, ``total_step``.

  Returns:
    A ``GradientTransformation`` whose state is an ``AdaLoraAllocatorState`` (``state.masks`` is the allocation).
    Use it as the outermost transformation: ``updates, state = tx.update(grads, state, adapters)``, then
    ``optax.apply_updates(adapters, updates)`` gives PEFT's parameters after ``optimizer.step()`` and
    ``update_and_allocate(t)``. With nnx: ``nnx.Optimizer(model, adalora_allocator(tx, config),
    wrt=jlora.nnx.LoraParam)`` (the masks are then keyed by module path).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> config = jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=4, target_rank=2, total_step=4)
    >>> adapters = {"kernel": {"lora_a": jnp.ones((3, 4)), "lora_e": jnp.arange(1.0, 5.0), "lora_b": jnp.ones((4, 2))}}
    >>> tx = jlora.adalora_allocator(optax.sgd(0.1), config)
    >>> state = tx.init(adapters)
    >>> for t in range(4):
    ...   grads = jax.tree.map(jnp.ones_like, adapters)
    ...   updates, state = tx.update(grads, state, adapters)
    ...   adapters = optax.apply_updates(adapters, updates)
    >>> int(state.budget), state.masks["kernel"].tolist()
    (2, [False, False, True, True])
  """
  _check_config(config, "adalora_allocator")
  final = config.total_step - config.tfinal

  def budgets(nodes, flat) -> tuple[int, int]:
    init_budget = sum(int(flat[n["lora_e"]].size) for n in nodes.values())
    matrices = sum(int(np.prod(flat[n["lora_e"]].shape[:-1], dtype=np.int64)) for n in nodes.values())
    target_budget = config.target_rank * matrices
    if target_budget >= init_budget:
      raise JloraError(f"adalora_allocator: the target budget target_rank * kernels = {target_budget} is not below the "
                       f"initial one (the sum of the ranks, {init_budget}): nothing to prune.")
    return init_budget, target_budget

  def init_fn(params):
    nodes, flat, _ = _nodes(params, "adalora_allocator")
    init_budget, _ = budgets(nodes, flat)
    zeros = {path: {name: jnp.zeros_like(flat[i]) for name, i in leaves.items()} for path, leaves in nodes.items()}
    masks = {path: jnp.ones(flat[leaves["lora_e"]].shape, bool) for path, leaves in nodes.items()}
    return AdaLoraAllocatorState(inner=tx.init(params), count=jnp.zeros((), jnp.int32), exp_avg_ipt=zeros,
                                 exp_avg_unc=jax.tree.map(jnp.zeros_like, zeros), masks=masks,
                                 budget=jnp.asarray(init_budget, jnp.int32))

  def update_fn(grads, state, params=None):
    if params is None:
      raise JloraError("adalora_allocator: the sensitivities |p * g| need the parameters: call "
                       "tx.update(grads, state, params).")
    updates, inner = tx.update(grads, state.inner, params)
    nodes, flat_params, _ = _nodes(params, "adalora_allocator")
    _, flat_grads, _ = _nodes(grads, "adalora_allocator (grads)")
    flat_updates, treedef = jax.tree_util.tree_flatten(updates)
    init_budget, target_budget = budgets(nodes, flat_params)
    t = state.count

    # PEFT's update_ipt, on the parameters after the optimizer's step.
    budgeting = t < final
    b1, b2 = config.beta1, config.beta2
    ipt, unc = {}, {}
    for path, leaves in nodes.items():
      ipt[path], unc[path] = {}, {}
      for name, i in leaves.items():
        p = flat_params[i]
        stepped = jnp.asarray(p + flat_updates[i]).astype(p.dtype)
        sensitivity = jnp.abs(stepped * flat_grads[i])
        avg = b1 * state.exp_avg_ipt[path][name] + (1 - b1) * sensitivity
        ipt[path][name] = jnp.where(budgeting, avg, state.exp_avg_ipt[path][name])
        uncertainty = b2 * state.exp_avg_unc[path][name] + (1 - b2) * jnp.abs(sensitivity - avg)
        unc[path][name] = jnp.where(budgeting, uncertainty, state.exp_avg_unc[path][name])

    # PEFT's budget_schedule and mask_to_budget.
    table = jnp.asarray(budget_table(init_budget, target_budget, config))
    in_table = jnp.clip(t - config.tinit - 1, 0, table.shape[0] - 1)
    budget = jnp.where(t <= config.tinit, init_budget, jnp.where(t <= final, table[in_table], target_budget))
    allocate = ((t > config.tinit) & (t < final) & (t % config.delta_t == 0)) | (t == final)
    scores = {path: triplet_scores(ipt[path], unc[path], flat_params[leaves["lora_e"]].ndim)
              for path, leaves in nodes.items()}
    everything = jnp.concatenate([s.reshape(-1) for s in scores.values()])
    k = jnp.maximum(init_budget - budget, 1)  # k = 0 happens only where no allocation is made
    threshold = jnp.sort(everything)[k - 1]
    masks = {path: jnp.where(allocate, scores[path] > threshold, state.masks[path]) for path in nodes}
    # Masked E is zeroed at allocations and, after the final one, at every step.
    zero_e = allocate | (t > final)
    for path, leaves in nodes.items():
      i = leaves["lora_e"]
      flat_updates[i] = jnp.where(zero_e & ~masks[path], -flat_params[i], flat_updates[i]).astype(flat_updates[i].dtype)
    # The final allocation resets the EMAs (PEFT's reset_ipt).
    ipt = jax.tree.map(lambda v: jnp.where(t == final, jnp.zeros_like(v), v), ipt)
    unc = jax.tree.map(lambda v: jnp.where(t == final, jnp.zeros_like(v), v), unc)
    state = AdaLoraAllocatorState(inner=inner, count=t + 1, exp_avg_ipt=ipt, exp_avg_unc=unc, masks=masks,
                                  budget=budget.astype(jnp.int32))
    return jax.tree_util.tree_unflatten(treedef, flat_updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def triplet_scores(ipt: Mapping, unc: Mapping, e_ndim: int) -> jax.Array:
  """Each triplet's importance ``s(E) + (mean_in s(A) + mean_out s(B))``, ``s = Ī * Ū`` (shaped like ``lora_e``)."""
  lead = e_ndim - 1
  score_a = ipt["lora_a"] * unc["lora_a"]  # lead + in + (r,)
  score_b = ipt["lora_b"] * unc["lora_b"]  # lead + (r,) + out
  mean_a = jnp.mean(score_a, axis=tuple(range(lead, score_a.ndim - 1)))
  mean_b = jnp.mean(score_b, axis=tuple(range(lead + 1, score_b.ndim)))
  return ipt["lora_e"] * unc["lora_e"] + (mean_a + mean_b)


def adalora_resize(adapters: Mapping, masks: Mapping, config) -> tuple[dict, Any]:
  """The AdaLoRA adapter at its allocated ranks, and the config that describes it (PEFT's ``rank_pattern``).

  Each kernel keeps the triplets its mask keeps, in their order; ``rank_pattern`` records the new rank per kernel
  (the scale stays ``alpha / init_rank``, as PEFT keeps ``ranknum``). A stacked (``nn.scan``) kernel has one rank
  for all its layers: the largest any layer keeps; a layer that keeps fewer is padded with its pruned triplets at
  ``E = 0``, which change nothing. A kernel that keeps nothing keeps one such triplet. The output is unchanged:
  ``Lora(model, new_config).apply(params, new_adapters, x)`` equals the masked adapter's output.

  Args:
    adapters: the trained AdaLoRA adapter tree (``jlora.Lora``'s nested dict).
    masks: ``{kernel path: bool array shaped like its lora_e}``, ``AdaLoraAllocatorState.masks``.
    config: the adapters' ``LoraConfig(variant="adalora", ...)``.

  Returns:
    ``(adapters, config)``: to save (``jlora.save_adapters``), export (``jlora.peft.save_pretrained``) or serve.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> config = jlora.LoraConfig(targets="kernel", variant="adalora", init_rank=3, target_rank=1, total_step=10)
    >>> adapters = {"kernel": {"lora_a": jnp.ones((2, 3)), "lora_e": jnp.array([1.0, 2.0, 3.0]),
    ...                        "lora_b": jnp.ones((3, 4))}}
    >>> small, small_config = jlora.adalora_resize(adapters, {"kernel": jnp.array([True, False, True])}, config)
    >>> small["kernel"]["lora_e"].tolist(), small_config.rank_pattern
    ([1.0, 3.0], {'kernel': 2})
  """
  _check_config(config, "adalora_resize")
  nodes, flat, treedef = _nodes(adapters, "adalora_resize")
  if set(masks) != set(nodes):
    raise JloraError(f"adalora_resize: masks are for {sorted(masks)}, the adapters have {sorted(nodes)}.")
  flat = [np.asarray(leaf) for leaf in flat]
  ranks = {}
  for path, leaves in nodes.items():
    lora_a, lora_e, lora_b = (flat[leaves[name]] for name in _LEAVES)
    mask = np.asarray(masks[path])
    if mask.shape != lora_e.shape or mask.dtype != bool:
      raise JloraError(f"adalora_resize: the mask of '{path}' is {mask.dtype}{list(mask.shape)}, its lora_e "
                       f"{list(lora_e.shape)}: give a bool mask per triplet (AdaLoraAllocatorState.masks).")
    rank = max(1, int(mask.sum(-1).max()))
    lead = lora_e.ndim - 1
    # Kept triplets first (in order), then the pruned ones, per layer/slice.
    order = np.argsort(~mask, axis=-1, kind="stable")[..., :rank]
    n_in = lora_a.ndim - lora_e.ndim
    flat[leaves["lora_a"]] = np.take_along_axis(lora_a, order.reshape(order.shape[:lead] + (1,) * n_in + (rank,)),
                                                axis=-1)
    flat[leaves["lora_e"]] = np.where(np.take_along_axis(mask, order, -1), np.take_along_axis(lora_e, order, -1),
                                      0).astype(lora_e.dtype)
    n_out = lora_b.ndim - lora_e.ndim
    flat[leaves["lora_b"]] = np.take_along_axis(lora_b, order.reshape(order.shape + (1,) * n_out), axis=lead)
    if rank != config.rank_for(path):
      ranks[re.escape(path)] = rank
  resized = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf) for leaf in flat])
  # The exact paths come first, so they win over the config's own patterns (first match wins).
  pattern = {**ranks, **{rule: rank for rule, rank in config.rank_pattern.items() if rule not in ranks}}
  return resized, dataclasses.replace(config, rank_pattern=pattern)
