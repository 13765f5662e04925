"""Adapter-only checkpoints through orbax, with the LoRA config, base fingerprint and a SHA-256 manifest.

Loading applies jlora's adapter safety checks (``jlora.LoadPolicy``): no pickled files, size caps,
the manifest when present (or required), strict metadata JSON, the exact expected tree with float
dtypes only, finite values, the base fingerprint (given a base, an adapter must store one unless
``LoadPolicy.allow_missing_fingerprint``), and (given the base) the update-norm report.
"""

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jlora import _paths
from jlora._config import RANDOM_INITS, LoraConfig, is_base_rewriting
from jlora._errors import JloraError
from jlora._fingerprint import fingerprint
from jlora._safety import (
  LoadPolicy,
  UnsafeAdapterError,
  check_base_fingerprint,
  check_dtypes,
  check_finite,
  enforce_norms,
  norm_report,
  read_json,
  refuse_pickle_name,
  verify_manifest,
  write_manifest,
)
from jlora._safety._regex import check_regex
from jlora.variants import FAMILIES, trainable_leaves, variant_for

_METADATA = "jlora_adapter.json"
_FORMAT = "jlora-adapter/1"
_ITEM = "adapters"


def save_adapters(path: str | os.PathLike, adapters: Mapping, config: LoraConfig, *,
                  base_fingerprint: str | None = None, extra: Mapping[str, Any] | None = None,
                  manifest: bool = True) -> None:
  """Writes ``adapters`` (orbax, under ``path/adapters``), ``path/jlora_adapter.json`` and ``path/SHA256SUMS``.

  Args:
    path: a new directory.
    adapters: the adapter tree (possibly sharded; orbax writes from every host).
    config: the LoraConfig the adapters were trained with.
    base_fingerprint: ``jlora.fingerprint(params)`` of the base model, checked on load. An adapter
      saved without one loads onto a given base only with ``LoadPolicy(allow_missing_fingerprint=True)``.
    extra: more JSON-serialisable metadata (e.g. training step, base model path).
    manifest: write a ``SHA256SUMS`` manifest of every file (``sha256sum -c`` format); a loader
      then refuses any modified file.
  """
  path = os.path.abspath(os.fspath(path))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, _ITEM), adapters)
  if jax.process_index() == 0:
    metadata = {"format": _FORMAT, "lora_config": config.to_dict(), "base_fingerprint": base_fingerprint,
                "extra": dict(extra or {})}
    with open(os.path.join(path, _METADATA), "w") as f:
      json.dump(metadata, f, indent=2, sort_keys=True)
    if manifest:
      write_manifest(path)


def load_adapter_metadata(path: str | os.PathLike, *, policy: LoadPolicy | None = None) -> dict:
  """The metadata of a saved adapter: ``lora_config`` (a LoraConfig), ``base_fingerprint``, ``extra``.

  Raises:
    UnsafeAdapterError: not an adapter directory, or metadata that is oversized, malformed or of an
      unknown format.
  """
  policy = policy or LoadPolicy()
  file = pathlib.Path(os.fspath(path)) / _METADATA
  if not file.exists():
    raise UnsafeAdapterError(f"{file} not found: {os.fspath(path)!r} is not a jlora adapter directory.")
  metadata = read_json(file, policy.max_json_bytes, "Adapter metadata")
  if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
    raise UnsafeAdapterError(f"{file}: unknown adapter format "
                             f"{metadata.get('format') if isinstance(metadata, dict) else None!r}, expected {_FORMAT!r}.")
  if set(metadata) != {"format", "lora_config", "base_fingerprint", "extra"}:
    raise UnsafeAdapterError(f"{file} has keys {sorted(metadata)}; expected format, lora_config, base_fingerprint, "
                             "extra.")
  if not isinstance(metadata["lora_config"], dict) or not isinstance(metadata["extra"], dict) or not (
      metadata["base_fingerprint"] is None or isinstance(metadata["base_fingerprint"], str)):
    raise UnsafeAdapterError(f"{file}: lora_config and extra must be objects and base_fingerprint a string or null.")
  raw = metadata["lora_config"]
  required = set(_CONFIG_FIELDS) - set(_ADDED_FIELDS)  # adapters saved before a field existed lack it
  if not required <= set(raw) <= set(_CONFIG_FIELDS):
    raise UnsafeAdapterError(f"{file}: lora_config has keys {sorted(raw)}; expected {sorted(required)}, optionally "
                             f"with {sorted(_ADDED_FIELDS)}.")
  for key, (valid, what) in _CONFIG_FIELDS.items():
    if key in raw and not valid(raw[key]):
      raise UnsafeAdapterError(f"{file}: lora_config.{key}={raw[key]!r} must be {what}.")
  targets = raw["targets"]
  for rule in [targets] if isinstance(targets, str) else targets:
    check_regex(rule, f"{file}: lora_config.targets")
  for key in ("rank_pattern", "alpha_pattern"):
    for rule in raw[key]:
      check_regex(rule, f"{file}: lora_config.{key}")
  try:
    metadata["lora_config"] = LoraConfig.from_dict(raw)
  except (JloraError, TypeError, ValueError) as e:
    raise UnsafeAdapterError(f"{file}: lora_config is not a valid LoraConfig: {e}") from None
  return metadata


def _is_rank(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The stored LoraConfig (``LoraConfig.to_dict``), field by field: untrusted JSON is type-checked before use.
_CONFIG_FIELDS = {
    "targets": (lambda v: isinstance(v, str) or isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
                "a regex or a non-empty list of regexes"),
    "rank": (_is_rank, "a positive int"),
    "alpha": (_is_number, "a finite number"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(map(_is_rank, v.values())), "{regex: positive int}"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(_is_number, v.values())), "{regex: finite number}"),
    "init": (lambda v: isinstance(v, str) and (v in RANDOM_INITS or is_base_rewriting(v)),
             "'kaiming_uniform', 'gaussian', 'pissa', 'pissa_niter_K' or 'olora'"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "variant": (lambda v: isinstance(v, str) and v in FAMILIES, "a registered variant family (jlora.variants)"),
    # VeRA's and AdaLoRA's options (present only in their configs; LoraConfig checks the ranges).
    **{name: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")
       for name in ("projection_seed", "init_rank", "target_rank", "tinit", "tfinal", "delta_t", "total_step")},
    **{name: (_is_number, "a finite number") for name in ("d_initial", "beta1", "beta2", "orth_reg_weight")},
    "save_projection": (lambda v: isinstance(v, bool), "true or false"),
    "invocation_tokens": (lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v), "a non-empty list of token ids"),
}
# Fields added after the first adapters were saved, or that only some variants have: absent means the default.
_ADDED_FIELDS = ("use_dora", "variant", "projection_seed", "d_initial", "save_projection", "init_rank", "target_rank",
                 "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight", "total_step", "invocation_tokens")


# Leaves whose last axis is the adapter's rank: LoRA's (and DoRA's, AdaLoRA's) A, VeRA's lambda_d.
_RANK_LEAVES = ("lora_a", "vera_lambda_d")


def _saved_tree(checkpointer: ocp.StandardCheckpointer, item: str) -> dict:
  saved = checkpointer.metadata(item)
  saved_tree = getattr(saved, "item_metadata", saved)
  saved_tree = getattr(saved_tree, "tree", saved_tree)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), dict(saved_tree))


def adapter_shapes(path: str | os.PathLike, *, policy: LoadPolicy | None = None) -> dict:
  """The tree saved by ``save_adapters`` as ``jax.ShapeDtypeStruct`` leaves, read from orbax's metadata.

  No array data is read: use it to inspect an adapter, or to pick the matching model layout (stacked
  ``layers/...`` vs unrolled ``layers_0/...`` paths) before building a restore target. The file checks
  of ``load_adapters`` (no pickles, size caps, the manifest) run first.

  Raises:
    UnsafeAdapterError: a refused file or manifest mismatch, or no readable orbax adapter tree.
  """
  policy = policy or LoadPolicy()
  directory = pathlib.Path(os.path.abspath(os.fspath(path)))
  verify_manifest(directory, covering=tuple(_check_files(directory, policy)), policy=policy)
  item = str(directory / _ITEM)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return _saved_tree(checkpointer, item)
  except Exception as e:  # orbax raises many types for a missing or damaged checkpoint
    raise UnsafeAdapterError(f"No readable adapter tree under {item}: {type(e).__name__}: {str(e)[:300]}") from e


def _check_files(directory: pathlib.Path, policy: LoadPolicy) -> list[str]:
  """The files a load reads (the metadata and the orbax tree), after pickle and size checks.

  Other entries of the directory (e.g. a training job's extra checkpoints) are not read, so they
  need not be in the manifest.
  """
  if not directory.is_dir():
    raise UnsafeAdapterError(f"{directory} is not a directory.")
  files = [directory / _METADATA, *sorted(p for p in (directory / _ITEM).rglob("*") if p.is_file())]
  for file in files:
    refuse_pickle_name(file)
    if file.is_file() and file.stat().st_size > policy.max_file_bytes:
      raise UnsafeAdapterError(f"{file} is {file.stat().st_size:,} bytes, over the {policy.max_file_bytes:,}-byte "
                               "cap (LoadPolicy.max_file_bytes).")
  return [f.relative_to(directory).as_posix() for f in files if f.is_file()]


def _check_config_describes(config: LoraConfig, tree: Mapping, params: Mapping | None, lora: Any, where: str) -> None:
  """The stored LoraConfig must describe the restored tree, or it would be returned for adapters it does not fit.

  Every adapter node of ``tree`` must hold exactly the leaves of the config's variant (a DoRA tree is not
  described by a plain LoRA config), and every adapted kernel (a ``lora_a`` or ``vera_lambda_d`` leaf's parent,
  whose last axis is the rank) must be a target of ``config`` with that rank. Given the caller's traced ``lora``
  (and ``params``), ``config`` must also select exactly ``lora``'s kernels with the same ranks and scales: the norm
  report and the caller's computation use those.
  """
  ranks = {_paths.join(path[:-1]): leaf.shape[-1] for path, leaf in _paths.iter_leaves(tree)
           if path[-1] in _RANK_LEAVES}
  leaves = set(variant_for(config).leaf_names)
  problems = [f"{_paths.join(path)} has leaves {sorted(node)}, a {variant_for(config).name} adapter {sorted(leaves)}"
              for path, node in _paths.iter_dicts(tree, lambda d: bool(set(trainable_leaves()) & set(d)))
              if set(node) != leaves]
  problems += [f"{kernel} is not a target" if not config.matches(kernel) else
              f"{kernel} has rank {rank}, the config says {config.rank_for(kernel)}"
              for kernel, rank in sorted(ranks.items())
              if not config.matches(kernel) or config.rank_for(kernel) != rank]
  if lora is not None and params is not None and config != lora.config:
    selected = {_paths.join(path) for path, _ in _paths.iter_leaves(params) if config.matches(_paths.join(path))}
    targets = lora.targets
    if selected != set(targets):
      problems.append(f"it selects {sorted(selected)[:8]}, the given lora adapts {sorted(targets)[:8]}")
    problems += [f"{kernel} gets scale {config.scale_for(kernel, target.rank)!r}, the given lora's is {target.scale!r}"
                 for kernel, target in sorted(targets.items())
                 if kernel in selected and config.scale_for(kernel, target.rank) != target.scale]
  if problems:
    raise UnsafeAdapterError(f"Adapter at {where}: the LoraConfig stored in {_METADATA} does not describe the saved "
                             f"adapters: {'; '.join(problems[:8])}.")


def _abstract(target: Mapping, sharding: Any) -> Any:
  if sharding is not None:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
                          sharding if not isinstance(sharding, jax.sharding.Sharding)
                          else jax.tree.map(lambda _: sharding, target))
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                    sharding=getattr(x, "sharding", None)),
      target)


def load_adapters(path: str | os.PathLike, target: Mapping, *, base_fingerprint: str | None = None,
                  sharding: Any = None, params: Mapping | None = None, lora: Any = None,
                  policy: LoadPolicy | None = None) -> tuple[dict, LoraConfig]:
  """Restores an adapter saved by ``save_adapters``, through jlora's adapter safety checks.

  Args:
    path: the directory given to ``save_adapters``.
    target: the expected adapter tree as arrays or ``jax.ShapeDtypeStruct`` (with ``sharding`` to
      restore straight onto a mesh), e.g. ``jax.eval_shape(lora.init, key, params, x)``. The saved
      tree must have exactly this structure, shapes and dtypes.
    base_fingerprint: if given, must equal the fingerprint stored at save time; an adapter saved
      without one is refused unless ``policy.allow_missing_fingerprint``.
    sharding: a ``jax.sharding.Sharding`` for every leaf, or a tree of them like ``target``;
      overrides the shardings in ``target``.
    params: the base params; their fingerprint is checked (as ``base_fingerprint``) when
      ``base_fingerprint`` is not given and, with ``lora``, the update-norm report runs.
    lora: the traced ``jlora.Lora`` the adapters belong to (enables the norm report, with ``params``).
    policy: size caps, manifest requirement and norm strictness (``jlora.LoadPolicy()`` by default).

  Returns:
    ``(adapters, config)``.

  Raises:
    UnsafeAdapterError: a pickled or oversized file, a manifest mismatch, missing/invalid metadata, a
      base-model mismatch or (given a base) no stored fingerprint, a stored LoraConfig that does not
      describe the saved tree (targets, ranks; given ``lora``, its targets and scales), a tree that
      does not match ``target``, a non-float dtype, NaN/inf values, or (strict policy) outlier update
      norms. Norm outliers warn (``AdapterNormWarning``) otherwise.
  """
  policy = policy or LoadPolicy()
  directory = pathlib.Path(os.path.abspath(os.fspath(path)))
  files = _check_files(directory, policy)
  verify_manifest(directory, covering=tuple(files), policy=policy)
  metadata = load_adapter_metadata(directory, policy=policy)
  if base_fingerprint is None and params is not None:
    base_fingerprint = fingerprint(params)
  check_base_fingerprint(metadata["base_fingerprint"], base_fingerprint, policy, f"Adapter at {os.fspath(path)!r}",
                         f'"base_fingerprint" is null in {_METADATA}',
                         "jlora.save_adapters stores one when given base_fingerprint=. ")
  abstract = _abstract(target, sharding)
  check_dtypes(abstract, f"target for {os.fspath(path)!r}")
  item = str(directory / _ITEM)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), _saved_tree(checkpointer, item))
      want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
      if want != got:
        raise UnsafeAdapterError(f"Adapter at {os.fspath(path)!r} does not match the expected tree:\n saved:    {got}\n "
                                 f"expected: {want}")
      adapters = checkpointer.restore(item, abstract)
  except UnsafeAdapterError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
    raise UnsafeAdapterError(f"Adapter at {os.fspath(path)!r} could not be read by orbax: {type(e).__name__}: "
                             f"{str(e)[:500]}") from e
  check_finite(adapters, f"at {os.fspath(path)!r}")
  if lora is not None and params is None:
    raise JloraError("load_adapters(lora=...) needs params= too: the norm report compares updates with the base.")
  _check_config_describes(metadata["lora_config"], abstract, params, lora, repr(os.fspath(path)))
  if lora is not None:
    enforce_norms(norm_report(lora, params, adapters, policy), policy, repr(os.fspath(path)))
  return adapters, metadata["lora_config"]
