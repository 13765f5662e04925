"""``combine``: several LoRA adapters of one base as one ordinary adapter (PEFT's ``add_weighted_adapter``)."""

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import _paths
from jlora._combine_reductions import SIGN_METHODS, reduce
from jlora._combine_svd import svd_algorithm, truncated_factors
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._lora import Lora
from jlora._safety import LoadPolicy, UnsafeAdapterError, check_dtypes, check_finite, enforce_norms, norm_report
from jlora._safety._norms_across import norms_across
from jlora._targets import Target

# combination_type -> (what is combined, reduction): A and B separately, ranks concatenated, or the
# dense updates followed by a truncated SVD.
METHODS = {
    "linear": ("factors", "task_arithmetic"),
    "ties": ("factors", "ties"),
    "dare_linear": ("factors", "dare_linear"),
    "dare_ties": ("factors", "dare_ties"),
    "magnitude_prune": ("factors", "magnitude_prune"),
    "cat": ("cat", None),
    "svd": ("svd", "task_arithmetic"),
    "ties_svd": ("svd", "ties"),
    "dare_linear_svd": ("svd", "dare_linear"),
    "dare_ties_svd": ("svd", "dare_ties"),
    "magnitude_prune_svd": ("svd", "magnitude_prune"),
}
# LoraConfig fields whose values a plain LoRA combination understands; any other field (a variant,
# activated-LoRA tokens, ...) must keep its default.
_PLAIN_FIELDS = ("targets", "rank", "alpha", "dropout", "use_rslora", "rank_pattern", "alpha_pattern", "init", "dtype")


def combine(model: nn.Module, params: Mapping, inputs: Sequence[tuple[Mapping, LoraConfig]], weights: Sequence[float],
            *example_inputs: Any, combination_type: str, svd_rank: int | None = None, svd_clamp: float | None = None,
            svd_driver: str | None = None, density: float | None = None, majority_sign_method: str | None = None,
            key: jax.Array | None = None, fingerprints: Sequence[str | None] | None = None,
            policy: LoadPolicy | None = None, example_kwargs: Mapping[str, Any] | None = None
            ) -> tuple[dict, LoraConfig]:
  """Combines LoRA adapters of one base model into one LoRA adapter, as PEFT's ``add_weighted_adapter``.

  Input ``i`` has, on each kernel it adapts, the update ``ΔW_i = s_i A_i B_i`` (``s_i`` its scale) and
  the weight ``w_i``. A kernel that an input does not adapt gets nothing from it (PEFT skips it; for
  every method that is the same as a zero update). Per ``combination_type``:

  * ``"linear"``: ``A = Σ sign(w_i s_i) √|w_i s_i| A_i``, ``B = Σ √|w_i s_i| B_i`` (PEFT's: *not*
    ``Σ w_i ΔW_i``, which has cross terms ``A_i B_j``; use ``cat`` or ``svd`` for that).
  * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: the same weights, with the
    TIES / DARE / magnitude-pruning reductions (``jlora._combine_reductions``) applied to the ``A_i``
    and to the ``B_i`` separately. These need one rank for all inputs (as in PEFT).
  * ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]``, ``B = [B_1; B_2; ...]`` along the rank axis,
    so ``A B = Σ w_i ΔW_i`` exactly; rank ``Σ r_i`` (unused rank zero-padded, as PEFT does).
  * ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
    the reduction of the ``w_i``-weighted dense updates ``ΔW_i`` (``svd``: ``Σ w_i ΔW_i``), truncated
    by SVD to rank ``svd_rank`` (default: the largest input rank), optionally with PEFT's quantile
    clamp ``svd_clamp`` on the factors. Singular-pair signs are fixed (largest entry of each left
    singular vector positive), so the clamp does not depend on the SVD routine.

  Ranks ``r_i`` are PEFT's per adapter: ``max(rank, *rank_pattern.values())``. The result has scale 1
  (``alpha = rank``, no rsLoRA), as PEFT's, except that PEFT keeps the first input's ``use_rslora``
  and then scales the result by ``√rank`` (huggingface/peft#3449); jlora does not. Pruning and the
  clamp act per layer of stacked (``nn.scan``) kernels, as on PEFT's per-layer modules. Deviation
  from PEFT: with a single input PEFT silently switches any method to ``linear``; jlora applies the
  method asked for (e.g. ``svd`` with ``svd_rank`` then truncates). PEFT's ``svd_full_matrices``
  only shapes factors that are truncated away, so it has no counterpart here.

  Untrusted inputs: each input is checked (dtypes, finite values, exact adapter tree) and its norm
  report runs (``jlora.norm_report``); then every input's modules are compared with the other
  inputs' modules, so an adapter whose updates are all outsized stands out. Flagged modules warn
  (``jlora.AdapterNormWarning``) or, with ``LoadPolicy(strict=True)``, are refused.

  Args:
    model: the unmodified ``flax.linen`` model of the base.
    params: the base params (arrays: the norm report reads them).
    inputs: ``(adapters, LoraConfig)`` pairs of plain LoRA adapters of this base (e.g. from
      ``jlora.load_adapters`` or ``jlora.peft.from_pretrained``).
    weights: one weight per input; negative weights subtract.
    *example_inputs: model inputs for tracing (as for ``Lora.init``); abstract, nothing is computed.
    combination_type: one of ``METHODS`` (PEFT's names).
    svd_rank: the rank of an ``*svd`` result (default: the largest input rank).
    svd_clamp: the quantile in ``[0, 1]`` for clamping ``*svd`` factors, or None.
    svd_driver: the SVD algorithm for ``*svd``: ``"qr"`` (PEFT's ``"gesvd"``), ``"jacobi"``
      (``"gesvdj"``, GPU), ``"polar"`` (GPU), ``"divide_and_conquer"``, or None (jax's default).
    density: the kept fraction, for the ``ties``, ``dare`` and ``magnitude_prune`` methods: ``[0, 1]``
      (``(0, 1]`` for DARE; 1 keeps everything).
    majority_sign_method: ``"total"`` (default) or ``"frequency"``, for the ``ties`` methods.
    key: a PRNG key, required by the DARE methods; each kernel's masks derive from it and the kernel's
      path (not from which other kernels are combined), so the same key gives the same result.
    fingerprints: one base fingerprint per input (``jlora.load_adapter_metadata(path)
      ["base_fingerprint"]``, or the one in a PEFT file); inputs with different ones are refused, and
      a None is refused unless ``policy.allow_missing_fingerprint``.
    policy: norm thresholds and strictness (``jlora.LoadPolicy``).
    example_kwargs: keyword model inputs for tracing.

  Returns:
    ``(adapters, config)``: an ordinary LoRA adapter of ``model`` (``jlora.Lora(model, config)``),
    which ``jlora.save_adapters`` saves and ``jlora.peft.save_pretrained`` exports. Its targets are
    the union of the inputs' target rules; its dtype, dropout and init are the first input's.

  Raises:
    JloraError: bad arguments, a non-plain-LoRA input, adapter trees that do not fit their config,
      different input ranks for a method that needs one rank, a DARE method without ``key``.
    UnsafeAdapterError: different (or, without the allowance, missing) base fingerprints; bad dtypes,
      NaN/inf; flagged update norms under ``LoadPolicy(strict=True)``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jlora
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> def trained(targets, rank, seed):  # stands for an adapter loaded from disk
    ...   config = jlora.LoraConfig(targets=targets, rank=rank, alpha=2.0 * rank)
    ...   shapes = jax.eval_shape(jlora.Lora(model, config).init, jax.random.key(0), params, x)
    ...   rng = np.random.default_rng(seed)
    ...   return jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes), config
    >>> first, second = trained(r".*/kernel", 2, 1), trained(r"layers_0/kernel", 3, 2)
    >>> adapters, config = jlora.combine(model, params, [first, second], [0.6, -0.4], x, combination_type="cat")
    >>> config.rank, config.alpha, jax.tree.map(jnp.shape, adapters["layers_0"]["kernel"])
    (5, 5.0, {'lora_a': (8, 5), 'lora_b': (5, 16)})
    >>> lora = jlora.Lora(model, config)
    >>> _ = lora.trace(params, x)
    >>> delta = lora.merge(params, adapters)["layers_0"]["kernel"] - params["layers_0"]["kernel"]
    >>> (a1, b1), (a2, b2) = [tuple(tree["layers_0"]["kernel"].values()) for tree, _ in (first, second)]
    >>> bool(jnp.allclose(delta, 0.6 * 2.0 * a1 @ b1 - 0.4 * 2.0 * a2 @ b2, atol=1e-6))  # cat is exact
    True
    >>> small, small_config = jlora.combine(model, params, [first, second], [0.6, -0.4], x,
    ...                                     combination_type="svd", svd_rank=2)
    >>> small_config.rank, jax.tree.map(jnp.shape, small["layers_0"]["kernel"])
    (2, {'lora_a': (8, 2), 'lora_b': (2, 16)})
  """
  policy = policy or LoadPolicy()
  options = _check_options(combination_type, inputs, weights, svd_rank, svd_clamp, svd_driver, density,
                           majority_sign_method, key, example_inputs)
  _check_fingerprints(fingerprints, len(inputs), policy)
  configs = [config for _, config in inputs]
  for i, config in enumerate(configs):
    _check_plain(config, i)
  # One abstract trace serves every input and the result: a kernel's layout does not depend on the config,
  # and the result's target rules are the union of the inputs' rules.
  rules = list(dict.fromkeys(rule for config in configs for rule in config.target_rules))
  traced = Lora(model, LoraConfig(targets=rules)).trace(params, *example_inputs, **(example_kwargs or {}))
  loras = [_traced_lora(model, config, traced, adapters, i) for i, (adapters, config) in enumerate(inputs)]

  reports = [norm_report(lora, params, adapters, policy) for lora, (adapters, _) in zip(loras, inputs)]
  for i, report in enumerate(reports):
    enforce_norms(report, policy, f"input {i} of jlora.combine")
  if len(reports) > 1:
    enforce_norms(norms_across(reports, [f"input {i}" for i in range(len(reports))], policy), policy,
                  "set passed to jlora.combine (each input against the others)")

  where, reduction = METHODS[combination_type]
  ranks = [max([config.rank, *config.rank_pattern.values()]) for config in configs]
  if where == "factors":
    if len(set(ranks)) != 1:
      raise JloraError(f"jlora.combine: combination_type={combination_type!r} combines A and B factor by factor, so "
                       f"every input needs the same rank (as in PEFT); the ranks are {ranks}. Use 'cat' or an svd "
                       "method for adapters of different ranks.")
    new_rank = ranks[0]
  elif where == "cat":
    new_rank = sum(ranks)
  else:
    new_rank = svd_rank or max(ranks)

  paths = _union_paths(loras)
  out_dtype = jnp.dtype(configs[0].dtype)
  combined, module_ranks = {}, {}
  for path in paths:
    present = [(i, _paths.get(adapters, tuple(path.split("/"))), lora.targets[path])
               for i, (lora, (adapters, _)) in enumerate(zip(loras, inputs)) if path in lora.targets]
    target = present[0][2]
    n_stack, n_batch = len(target.stack_shape), len(target.layout.batch_axes)
    scaled = [(float(weights[i]) * target_i.scale, node) for i, node, target_i in present]
    # DARE masks depend on the kernel's path only, not on which other kernels are combined.
    module_key = None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()))
    if where == "factors":
      module_rank = {node["lora_a"].shape[-1] for _, node in scaled}
      if len(module_rank) != 1:
        raise JloraError(f"jlora.combine: '{path}' has ranks {sorted(module_rank)} in different inputs; "
                         f"combination_type={combination_type!r} needs one rank per kernel. Use 'cat' or an svd method.")
      a, b = _combine_factors(
          [node["lora_a"] for _, node in scaled], [node["lora_b"] for _, node in scaled],
          jnp.asarray([math.sqrt(abs(ws)) * (1 if ws >= 0 else -1) for ws, _ in scaled], jnp.float32),
          jnp.asarray([math.sqrt(abs(ws)) for ws, _ in scaled], jnp.float32), module_key,
          reduction=reduction, density=options["density"], sign_method=options["sign_method"], n_stack=n_stack)
      module_ranks[path] = module_rank.pop()
    elif where == "cat":
      a, b = _concatenate([node["lora_a"] for _, node in scaled], [node["lora_b"] for _, node in scaled],
                          jnp.asarray([ws for ws, _ in scaled], jnp.float32), rank=new_rank, rank_axis=n_stack + n_batch)
      module_ranks[path] = new_rank
    else:
      update = _reduced_update(
          [node["lora_a"] for _, node in scaled], [node["lora_b"] for _, node in scaled],
          jnp.asarray([target_i.scale for _, _, target_i in present], jnp.float32),
          jnp.asarray([float(weights[i]) for i, _, _ in present], jnp.float32), module_key,
          reduction=reduction, density=options["density"], sign_method=options["sign_method"], n_stack=n_stack,
          n_lead=n_stack + n_batch)
      layout = target.layout
      a, b = _truncate(update, rank=new_rank, clamp=None if svd_clamp is None else float(svd_clamp), n_stack=n_stack,
                       algorithm=options["algorithm"], in_shape=tuple(layout.shape[i] for i in layout.in_axes),
                       out_shape=tuple(layout.shape[i] for i in layout.out_axes))
      module_ranks[path] = new_rank
    combined[tuple(path.split("/"))] = {"lora_a": a.astype(out_dtype), "lora_b": b.astype(out_dtype)}

  odd = {re.escape(path): rank for path, rank in module_ranks.items() if rank != new_rank}
  config = dataclasses.replace(configs[0], targets=rules, rank=new_rank, alpha=float(new_rank), use_rslora=False,
                               rank_pattern=odd, alpha_pattern={rule: float(rank) for rule, rank in odd.items()})
  adapters = _paths.nest(combined)
  _traced_lora(model, config, traced, adapters, "combined by jlora.combine")
  return adapters, config


def _check_options(combination_type, inputs, weights, svd_rank, svd_clamp, svd_driver, density, majority_sign_method,
                   key, example_inputs) -> dict:
  if combination_type not in METHODS:
    raise JloraError(f"jlora.combine: combination_type={combination_type!r} is not one of {sorted(METHODS)}.")
  if not inputs:
    raise JloraError("jlora.combine: no inputs; pass a list of (adapters, LoraConfig) pairs.")
  if any(not isinstance(item, tuple | list) or len(item) != 2 or not isinstance(item[1], LoraConfig)
         for item in inputs):
    raise JloraError("jlora.combine: inputs must be (adapters, LoraConfig) pairs.")
  if len(weights) != len(inputs) or not all(math.isfinite(float(w)) for w in weights):
    raise JloraError(f"jlora.combine: {len(inputs)} inputs need {len(inputs)} finite weights, got {list(weights)}.")
  if not example_inputs:
    raise JloraError("jlora.combine: pass the model's example inputs after the weights (as for lora.init), so each "
                     "adapter's kernels can be traced.")
  where, reduction = METHODS[combination_type]
  given = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver, "density": density,
           "majority_sign_method": majority_sign_method, "key": key}
  used = set()
  if where == "svd":
    used |= {"svd_rank", "svd_clamp", "svd_driver"}
  if reduction in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
    used.add("density")
  if reduction in ("ties", "dare_ties"):
    used.add("majority_sign_method")
  if reduction in ("dare_linear", "dare_ties"):
    used.add("key")
  unused = sorted(name for name, value in given.items() if value is not None and name not in used)
  if unused:
    raise JloraError(f"jlora.combine: {unused} do nothing for combination_type={combination_type!r}; "
                     f"it takes {sorted(used) or 'none of the method options'}.")
  if "density" in used:
    dare = reduction.startswith("dare")
    if density is None or not (0.0 < float(density) <= 1.0 if dare else 0.0 <= float(density) <= 1.0):
      raise JloraError(f"jlora.combine: combination_type={combination_type!r} needs density in "
                       f"{'(0, 1]' if dare else '[0, 1]'} (the fraction of entries kept), got {density!r}.")
  if "key" in used and key is None:
    raise JloraError(f"jlora.combine: combination_type={combination_type!r} drops entries at random: pass "
                     "key=jax.random.key(...).")
  if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
    raise JloraError(f"jlora.combine: majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")
  if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
    raise JloraError(f"jlora.combine: svd_rank must be a positive int or None, got {svd_rank!r}.")
  if svd_clamp is not None and not 0.0 <= float(svd_clamp) <= 1.0:
    raise JloraError(f"jlora.combine: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}.")
  return {"density": None if density is None else float(density), "sign_method": majority_sign_method or "total",
          "algorithm": svd_algorithm(svd_driver)}


def _check_fingerprints(fingerprints, count: int, policy: LoadPolicy) -> None:
  if fingerprints is None:
    return
  if len(fingerprints) != count:
    raise JloraError(f"jlora.combine: {count} inputs but {len(fingerprints)} fingerprints.")
  missing = [i for i, fingerprint in enumerate(fingerprints) if fingerprint is None]
  if missing and not policy.allow_missing_fingerprint:
    raise UnsafeAdapterError(f"jlora.combine: inputs {missing} carry no base fingerprint, so nothing shows they were "
                             "trained on the same base as the others; refused. Pass "
                             "policy=jlora.LoadPolicy(allow_missing_fingerprint=True) to combine them anyway.")
  known = {fingerprint for fingerprint in fingerprints if fingerprint is not None}
  if len(known) > 1:
    groups = {fingerprint: [i for i, f in enumerate(fingerprints) if f == fingerprint] for fingerprint in known}
    raise UnsafeAdapterError(f"jlora.combine: the inputs were trained on different base models (inputs by base "
                             f"fingerprint: {groups}); adapters of different bases cannot be combined.")


def _check_plain(config: LoraConfig, i: int) -> None:
  if config.rewrites_base:
    raise JloraError(f"jlora.combine: input {i} has init={config.init!r}: it belongs to the residual base its init "
                     "computed, not to the base the others adapt. Convert it first to the plain LoRA of the original "
                     "base (jlora.variants.to_plain_lora).")
  for field in dataclasses.fields(config):
    if field.name in _PLAIN_FIELDS:
      continue
    if field.default is not dataclasses.MISSING:
      default = field.default
    elif field.default_factory is not dataclasses.MISSING:
      default = field.default_factory()
    else:
      default = dataclasses.MISSING  # a required field this function does not know: not plain LoRA
    if getattr(config, field.name) != default:
      raise JloraError(f"jlora.combine: input {i} sets LoraConfig.{field.name}={getattr(config, field.name)!r}; "
                       "combining supports plain LoRA adapters only.")


def _traced_lora(model: nn.Module, config: LoraConfig, traced: Mapping[str, Target], adapters: Mapping,
                 which: int | str) -> Lora:
  """A Lora of ``config`` whose targets come from ``traced``, checked against ``adapters``."""
  source = f"input {which} of jlora.combine" if isinstance(which, int) else which
  lora = Lora(model, config)
  if lora.variant.name != "lora":
    raise JloraError(f"jlora.combine: {source} is a {lora.variant.name!r} adapter; combining supports plain LoRA "
                     "adapters only.")
  # What lora.trace would find, without tracing the model again: the layouts are the config-independent
  # part, rank and scale follow the config.
  lora._targets = {path: dataclasses.replace(target, rank=config.rank_for(path),
                                             scale=config.scale_for(path, config.rank_for(path)))
                   for path, target in traced.items() if config.matches(path)}
  nodes = {_paths.join(path): node for path, node in lora._adapter_nodes(adapters)}
  if set(nodes) != set(lora.targets):
    raise JloraError(f"jlora.combine: the adapter tree of {source} has adapters at {sorted(nodes)} but its "
                     f"LoraConfig targets {sorted(lora.targets)}; pass each adapter with its own config.")
  for path, target in lora.targets.items():
    lora._check_adapter(target, nodes[path], f"of {source}")
  check_dtypes(adapters, source)
  check_finite(adapters, source)
  return lora


def _union_paths(loras: Sequence[Lora]) -> list[str]:
  return list(dict.fromkeys(path for lora in loras for path in lora.targets))


@functools.partial(jax.jit, static_argnames=("reduction", "density", "sign_method", "n_stack"))
def _combine_factors(a_list, b_list, weights_a, weights_b, key, *, reduction, density, sign_method, n_stack):
  def one(tensors, tensor_weights, which):
    tensors = [jnp.asarray(t, jnp.float32) for t in tensors]
    return reduce(reduction, tensors, tensor_weights, density=density, sign_method=sign_method,
                  key=None if key is None else jax.random.fold_in(key, which), n_stack=n_stack)

  return one(a_list, weights_a, 0), one(b_list, weights_b, 1)


@functools.partial(jax.jit, static_argnames=("rank", "rank_axis"))
def _concatenate(a_list, b_list, weights, *, rank, rank_axis):
  a = jnp.concatenate([jnp.asarray(t, jnp.float32) * w for t, w in zip(a_list, weights)], axis=-1)
  b = jnp.concatenate([jnp.asarray(t, jnp.float32) for t in b_list], axis=rank_axis)
  a_pad = [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]
  b_pad = [(0, 0)] * b.ndim
  b_pad[rank_axis] = (0, rank - b.shape[rank_axis])
  return jnp.pad(a, a_pad), jnp.pad(b, b_pad)


@functools.partial(jax.jit, static_argnames=("reduction", "density", "sign_method", "n_stack", "n_lead"))
def _reduced_update(a_list, b_list, scales, weights, key, *, reduction, density, sign_method, n_stack, n_lead):
  """The reduction of the weighted updates ``s_i A_i B_i``, as ``lead + (out, in)`` matrices."""
  lead, fan_in = a_list[0].shape[:n_lead], math.prod(a_list[0].shape[n_lead:-1])
  fan_out = math.prod(b_list[0].shape[n_lead + 1:])
  deltas = []
  for a, b, scale in zip(a_list, b_list, scales):
    a_in_r = jnp.asarray(a, jnp.float32).reshape(lead + (fan_in, a.shape[-1]))
    b_r_out = jnp.asarray(b, jnp.float32).reshape(lead + (b.shape[n_lead], fan_out))
    deltas.append(scale * jnp.matmul(a_in_r, b_r_out, precision=jax.lax.Precision.HIGHEST))
  delta = reduce(reduction, deltas, weights, density=density, sign_method=sign_method, key=key, n_stack=n_stack)
  return jnp.swapaxes(delta, -1, -2)


# Separate from the reduction, so every svd method shares one compiled SVD per kernel shape.
@functools.partial(jax.jit, static_argnames=("rank", "clamp", "n_stack", "algorithm", "in_shape", "out_shape"))
def _truncate(m_out_in, *, rank, clamp, n_stack, algorithm, in_shape, out_shape):
  a_in_k, b_k_out = truncated_factors(m_out_in, rank, clamp=clamp, n_stack=n_stack, algorithm=algorithm)
  lead = m_out_in.shape[:-2]
  return a_in_k.reshape(lead + in_shape + (rank,)), b_k_out.reshape(lead + (rank,) + out_shape)
