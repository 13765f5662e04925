"""ReLoRA (Lialin et al., 2023): a high-rank update from low-rank ones, by merging and restarting the adapters.

Every ``every`` steps a ReLoRA run folds the adapters into the base (float32), restarts them (``A`` fresh from a
new key, ``B = 0``: the output is unchanged), prunes the optimizer's moments of the adapter leaves to their
largest ``keep_fraction`` by magnitude (the paper keeps 1%; ``keep_fraction=0`` resets them; ``relora_prune``
keeps an entry's moments together), and re-warms the
learning rate (a jagged cosine). Each cycle adds a rank-``r`` update, so ``k`` cycles reach rank up to ``k·r``.

What changed is kept apart from the frozen base, which is never copied: ``update`` holds the accumulated float32
``W - W0`` of the *targeted kernels only* (a nested dict like ``params``, with nothing but those kernels), and
``relora_apply(params, update)`` gives the base a cycle trains on, each targeted kernel ``W0 + update`` cast once
to its dtype, every other leaf shared with ``params``. Carry ``update`` in the train state and its checkpoints:
4 bytes per targeted base parameter, however many restarts.

Pure functions, composable with ``jax.jit``:

* ``relora_init(lora, params)``: the zero update;
* ``relora_apply(params, update)``: the base of the current cycle;
* ``relora_fold(lora, params, update, adapters)``: the update with the adapters folded in (the run's result is
  ``relora_apply(params, relora_fold(...))``: not a low-rank adapter);
* ``relora_restart(lora, params, update, adapters, key)``: fold, and fresh adapters on the new base;
* ``relora_prune(lora, adapters, opt_state, keep_fraction)``: the optimizer state with the adapters' moments pruned;
* ``relora_schedule(schedule, every, warmup_steps)``: the jagged learning-rate schedule.

ReLoRA restarts LoRA and DoRA adapters with a random init. Other variants are refused: VeRA's restarted update
stays in its fixed projections' span (rank ``r`` however many cycles), a PiSSA/OLoRA restart is undefined,
AdaLoRA's allocator state and activated LoRA's position-dependent update do not fold into a kernel.
"""

import functools
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jlora import _paths
from jlora._config import RANDOM_INITS
from jlora._errors import JloraError
from jlora.quant._quantized import is_quantized
from jlora.variants import DORA, LORA

_RESTARTABLE = (LORA, DORA)


def _check(lora, what: str) -> None:
  if lora.variant not in _RESTARTABLE or lora.config.init not in RANDOM_INITS:
    raise JloraError(f"{what}: ReLoRA restarts LoRA and DoRA adapters with a random init ({list(RANDOM_INITS)}); "
                     f"this Lora is variant {lora.variant.name!r} with init={lora.config.init!r}. VeRA's update stays "
                     "in its fixed projections' span, a PiSSA/OLoRA restart is not defined, and AdaLoRA's allocator "
                     "and activated LoRA's position-dependent update do not fold into a kernel.")


def _kernel(params: Mapping, keys: tuple[str, ...], what: str) -> jax.Array:
  if not _paths.contains(params, keys):
    raise JloraError(f"{what}: the update has '{_paths.join(keys)}', which params do not have.")
  kernel = _paths.get(params, keys)
  if is_quantized(kernel):
    raise JloraError(f"{what}: '{_paths.join(keys)}' is quantized (jlora.quant). ReLoRA folds each cycle into the "
                     "base: a quantized base would be requantized (lossy) at every restart, or kept in float, which "
                     "undoes QLoRA's memory saving. Train ReLoRA over a float (e.g. bfloat16) base.")
  return kernel


def relora_init(lora, params: Mapping) -> dict:
  """The update of a run that has not restarted yet: float32 zeros shaped like each targeted kernel.

  Args:
    lora: the ``jlora.Lora`` (traced: after ``init``/``trace``).
    params: the frozen base (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{...: {kernel name: zeros}}``, nested like ``params``, holding the targeted kernels only.
  """
  _check(lora, "relora_init")
  return _paths.nest({keys: jnp.zeros(_kernel(params, keys, "relora_init").shape, jnp.float32)
                      for keys in (tuple(path.split("/")) for path in lora.targets)})


def relora_apply(params: Mapping, update: Mapping) -> dict:
  """The base a cycle trains on: each kernel of ``update`` becomes ``(W0 + update)`` (float32, cast once to W0's dtype).

  Every leaf that ``update`` does not hold is shared with ``params``; ``params`` is not modified.

  Raises:
    JloraError: ``update`` names a kernel that ``params`` lacks, of another shape, or a quantized one.
  """
  out = {}
  for keys, delta in _paths.iter_leaves(update):
    kernel = _kernel(params, keys, "relora_apply")
    if tuple(kernel.shape) != tuple(delta.shape):
      raise JloraError(f"relora_apply: the update of '{_paths.join(keys)}' is {tuple(delta.shape)}, the kernel "
                       f"{tuple(kernel.shape)}.")
    out[keys] = (kernel.astype(jnp.float32) + delta.astype(jnp.float32)).astype(kernel.dtype)
  return _paths.replace(params, out)


def relora_fold(lora, params: Mapping, update: Mapping, adapters: Mapping) -> dict:
  """``update`` with the adapters folded in: what ``relora_apply`` must add to ``params`` to serve them merged.

  Each kernel gets the variant's merge of the kernel the model computed with (``relora_apply(params, update)``),
  in float32: ``update + (merge(W) - W)``, i.e. ``+ s·A@B`` for LoRA and DoRA's rescaled ``W + s·A@B`` minus ``W``.

  Args:
    lora: the traced ``jlora.Lora`` (LoRA or DoRA, random init).
    params: the frozen base of the run (the cycle's base is ``relora_apply(params, update)``).
    update: the accumulated update (``relora_init``, then ``relora_fold``/``relora_restart``'s).
    adapters: the adapters of the current cycle.

  Returns:
    The new update (float32, the same tree shape as ``update``).
  """
  _check(lora, "relora_fold")
  nodes = dict(lora._adapter_nodes(adapters))  # checks that the tree holds exactly the variant's adapters
  out = {}
  for path, target in lora.targets.items():
    keys = tuple(path.split("/"))
    if keys not in nodes or not _paths.contains(update, keys):
      raise JloraError(f"relora_fold: no adapter or no update for the target '{path}'.")
    lora._check_adapter(target, nodes[keys], "in the adapter tree")
    delta = _paths.get(update, keys).astype(jnp.float32)
    kernel = _kernel(params, keys, "relora_fold")
    seen = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype).astype(jnp.float32)  # as relora_apply gives it
    merged, _ = lora.variant.merge(seen, nodes[keys], target, None)
    out[keys] = delta + (merged.astype(jnp.float32) - seen)
  if len(out) != sum(1 for _ in _paths.iter_leaves(update)):
    raise JloraError("relora_fold: the update holds kernels that are not targets of this Lora.")
  return _paths.nest(out)


def relora_restart(lora, params: Mapping, update: Mapping, adapters: Mapping, key: jax.Array) -> tuple[dict, dict]:
  """ReLoRA's merge-and-restart: ``(update', adapters')``.

  ``update' = relora_fold(lora, params, update, adapters)``, and ``adapters'`` are fresh adapters on the new base
  ``relora_apply(params, update')``, so the model's output does not change: ``A`` from ``key`` (per kernel, as
  ``Lora.init`` folds the path into it), ``B = 0``, DoRA's magnitude the new kernel's column norms.

  Args:
    lora: the traced ``jlora.Lora`` (LoRA or DoRA, ``init`` "kaiming_uniform" or "gaussian").
    params: the frozen base (never modified).
    update: the accumulated update so far.
    adapters: the trained adapters of the ending cycle.
    key: a PRNG key for the new ``A`` factors (a new one per restart).

  Returns:
    ``(update', adapters')``. Prune the optimizer state with ``relora_prune``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jlora
    >>> model = nn.Dense(6)
    >>> x = jnp.ones((2, 6))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets="kernel", rank=1, alpha=1.0))
    >>> adapters = lora.init(jax.random.key(1), params, x)
    >>> update, tx = jlora.relora_init(lora, params), optax.adam(1e-2)
    >>> opt_state = tx.init(adapters)
    >>> for cycle in range(3):
    ...   noise = jax.random.normal(jax.random.key(cycle), (1, 6))  # ... training moves B ...
    ...   adapters = {"kernel": {**adapters["kernel"], "lora_b": adapters["kernel"]["lora_b"] + noise}}
    ...   update, adapters = jlora.relora_restart(lora, params, update, adapters, jax.random.key(10 + cycle))
    ...   opt_state = jlora.relora_prune(lora, adapters, opt_state, keep_fraction=0.01)
    >>> int(jnp.linalg.matrix_rank(update["kernel"]))  # three rank-1 cycles
    3
    >>> served = jlora.relora_apply(params, update)  # the base of the next cycle; adapters restart at B = 0
    >>> bool(jnp.allclose(lora.apply(served, adapters, x), model.apply({"params": served}, x)))
    True
  """
  _check(lora, "relora_restart")
  new_update = relora_fold(lora, params, update, adapters)
  base = relora_apply(params, new_update)
  fresh = {}
  for path, target in lora.targets.items():
    keys = tuple(path.split("/"))
    # The same per-kernel key as Lora.init_with_base: the path alone decides it.
    node_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
    fresh[keys], _ = lora.variant.init(node_key, target, lora.config, _paths.get(base, keys))
  return new_update, _paths.nest(fresh)


def _key_name(key: Any) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _top(x: jax.Array, lead: int, keep_fraction: float) -> jax.Array:
  """Where ``|x|`` is above its ``1 - keep_fraction`` quantile, per index of the first ``lead`` axes (each stacked
  layer is a tensor of its own, as each layer's module is in PyTorch)."""
  magnitude = jnp.abs(x.astype(jnp.float32)).reshape(x.shape[:lead] + (-1,))
  threshold = jnp.quantile(magnitude, 1.0 - keep_fraction, axis=-1, keepdims=True)
  return (magnitude > threshold).reshape(x.shape)


def relora_prune(lora, adapters: Mapping, opt_state: optax.OptState, keep_fraction: float = 0.01) -> optax.OptState:
  """The optimizer state with the moments of every adapter leaf pruned by magnitude, as ReLoRA does at a restart.

  Each per-parameter state array of an adapter leaf (Adam's ``mu`` and ``nu``, a momentum, ...) marks its entries
  above its ``1 - keep_fraction`` quantile of magnitude (linear interpolation, as ``torch.quantile``), each stacked
  layer on its own; an entry marked in any of the leaf's arrays is kept in all of them, every other entry is zeroed.
  ReLoRA prunes ``m`` and ``v`` apart; kept apart, a surviving ``m`` over a zeroed ``v`` divides by Adam's ``eps``,
  and right after a restart ``B = 0`` gives ``A`` zero gradients, so that ``v`` stays zero and the step explodes
  (``tests/test_relora.py`` shows both): the moments of one entry are kept or dropped together. ``keep_fraction=0``
  resets them to zero. Step counts, schedules and the state of other parameters (a task head trained beside the
  adapters) are kept.

  An array belongs to an adapter leaf when its key path in ``opt_state`` ends with the leaf's path (kernel path +
  leaf name) and its shape is the leaf's: so the optimizer may run over the adapter tree or over a tree holding it
  (``{"lora": adapters, "head": ...}``), through ``optax.chain``, ``multi_transform`` (``jlora.lora_plus``), ...

  Args:
    lora: the traced ``jlora.Lora``.
    adapters: the adapter tree (its paths and shapes; the values are not read).
    opt_state: the optimizer's state.
    keep_fraction: the share of entries each array marks, in ``[0, 1]``; the paper keeps 0.01.

  Returns:
    The pruned state, the same tree structure.

  Raises:
    JloraError: ``keep_fraction`` outside ``[0, 1]``, or no state array of an adapter leaf was found.
  """
  if not 0.0 <= keep_fraction <= 1.0:
    raise JloraError(f"relora_prune: keep_fraction must be in [0, 1], got {keep_fraction!r}.")
  leaves = {}
  for keys, node in lora._adapter_nodes(adapters):
    lead = len(lora.targets[_paths.join(keys)].stack_shape)
    for name, leaf in node.items():
      leaves[keys + (name,)] = (tuple(leaf.shape), lead)
  lengths = sorted({len(k) for k in leaves})
  flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
  owners: dict[tuple[str, ...], list[int]] = {}  # adapter leaf -> indices of its state arrays in ``flat``
  for i, (path, x) in enumerate(flat):
    names = tuple(_key_name(k) for k in path)
    owner = next((names[-n:] for n in lengths if len(names) >= n and names[-n:] in leaves), None)
    if owner is not None and tuple(jnp.shape(x)) == leaves[owner][0] and jnp.issubdtype(jnp.result_type(x),
                                                                                         jnp.floating):
      owners.setdefault(owner, []).append(i)
  if not owners:
    raise JloraError("relora_prune: no optimizer state of the adapter leaves was found in opt_state (its key paths "
                     "must end with each adapter leaf's path, as optax's per-parameter states do).")
  out = [x for _, x in flat]
  if keep_fraction == 1.0:
    return jax.tree_util.tree_unflatten(treedef, out)
  for owner, indices in owners.items():
    if keep_fraction == 0.0 or not out[indices[0]].size:
      keep = jnp.zeros(leaves[owner][0], bool)
    else:
      keep = functools.reduce(jnp.logical_or, [_top(out[i], leaves[owner][1], keep_fraction) for i in indices])
    for i in indices:
      out[i] = jnp.where(keep, out[i], jnp.zeros_like(out[i]))
  return jax.tree_util.tree_unflatten(treedef, out)


def relora_schedule(schedule: optax.Schedule, every: int, warmup_steps: int) -> optax.Schedule:
  """ReLoRA's jagged schedule: ``schedule``, re-warmed after every restart.

  ``lr(t) = schedule(t) * min(1, (t mod every) / warmup_steps)`` once ``t >= every``, else ``schedule(t)``: after
  each restart (at ``t = every, 2·every, ...`` updates) the rate drops to zero and climbs linearly back to the
  underlying schedule (e.g. warmup + cosine decay) over ``warmup_steps`` updates.

  Args:
    schedule: the underlying schedule (its first warmup is its own).
    every: updates between restarts (positive).
    warmup_steps: length of the warmup after each restart (0: no re-warmup).

  Example:
    >>> import optax, jlora
    >>> jagged = jlora.relora_schedule(optax.constant_schedule(1.0), every=4, warmup_steps=2)
    >>> [float(jagged(t)) for t in range(10)]
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
  """
  if every < 1 or warmup_steps < 0:
    raise JloraError(f"relora_schedule: every must be positive and warmup_steps non-negative, got every={every!r}, "
                     f"warmup_steps={warmup_steps!r}.")

  def jagged(count):
    since = count % every
    ramp = jnp.minimum(1.0, since / max(warmup_steps, 1))
    return schedule(count) * jnp.where((count >= every) & (since < warmup_steps), ramp, 1.0)

  return jagged
