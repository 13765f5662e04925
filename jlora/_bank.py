"""AdapterBank: many adapters of one base model as one fixed-shape pytree, applied per row, compiled once.

The bank's state (``BankState``) has the same shapes whatever it holds: for every kernel the bank may adapt,
the factors of all ``slots`` adapters with ranks zero-padded to ``max_rank``, a scale per slot (0 where a
slot does not adapt that kernel), the slot's rank, its dropout rate and its activated-LoRA invocation
sequence (padded to ``max_invocation_length``). Loading, replacing or clearing a slot returns a new state of
the same shapes, so a jitted step that takes the state never recompiles.

Adapters enter through the safe loading path: ``load`` reads jlora checkpoints with ``jlora.load_adapters``
and PEFT directories with ``jlora.peft.from_pretrained_with_base``, with every check they apply (files,
manifest, base fingerprint against the bank's base, exact tree, finite values, the adapter's own update-norm
report); then the bank's update norms are compared across its slots (``jlora._safety._norms_across``), so an
adapter whose updates are outsized against the others stands out: a warning, or a refusal with
``LoadPolicy(strict=True)``. A load that fails returns nothing: the state the caller holds is unchanged.

Every slot is held in LoRA form ``(A, B, s)``: LoRA and activated LoRA as they are, VeRA as
``(A_shared[:fan_in]·λ_d, λ_b·B_shared, 1)`` and AdaLoRA as ``(A⊙E, B, s)``, both exact. DoRA is refused: its
output is rescaled per output feature by ``m / ||W + s·A@B||``, a column norm of each slot's merged kernel,
which a mixed batch would have to recompute per slot in every call (or keep stale while training).
"""

import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import _paths
from jlora._bank_apply import BANK_KEY, BANK_PREFIX, run_bank
from jlora._bank_kernels import KERNELS
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._fingerprint import fingerprint
from jlora._lora import Lora
from jlora._safety import (
  LoadPolicy,
  NormReport,
  UnsafeAdapterError,
  check_base_fingerprint,
  check_finite,
  enforce_norms,
)
from jlora._safety._norms import _summarise
from jlora._safety._norms_across import norms_across
from jlora._targets import Target
from jlora._variant import STATE_KEY, split_state
from jlora.quant._quantized import is_quantized
from jlora.variants import ADALORA, ALORA, DORA, LORA, VERA
from jlora.variants._adalora import scaled_a
from jlora.variants._lora import factor_norms
from jlora.variants._vera import factors as vera_factors

_JLORA_METADATA = "jlora_adapter.json"
_PEFT_CONFIG = "adapter_config.json"


class BankState(NamedTuple):
  """The arrays of an adapter bank (a pytree; every field keeps its shape whatever the slots hold).

  Attributes:
    factors: the trainable part: at every adapted kernel's path ``{"lora_a": stack + (S,) + batch + in + (R,),
      "lora_b": stack + (S,) + batch + (R,) + out}`` (``S`` slots, ranks zero-padded to ``R = max_rank``).
    scales: ``{kernel path: (S,) float32}``: each slot's scale on that kernel, 0 where it has no adapter.
    ranks: ``{kernel path: (S,) int32}``: each slot's rank there (0: none).
    dropout: ``(S,) float32``: each slot's adapter dropout rate (used when a ``dropout`` rng is given).
    invocation: ``(S, L) int32``: each slot's activated-LoRA invocation sequence, padded with -1.
    invocation_length: ``(S,) int32``: its length; 0 for an adapter that is not activated LoRA.
    occupied: ``(S,) bool``: the slot holds an adapter.
  """

  factors: dict
  scales: dict
  ranks: dict
  dropout: jax.Array
  invocation: jax.Array
  invocation_length: jax.Array
  occupied: jax.Array


class AdapterBank:
  """Up to ``slots`` adapters of one base model, served (and trained) side by side in one batch.

  Each row ``b`` of a batch names its slot ``adapter_ids[b]`` (-1: the base model alone) and gets, in every
  adapted module, ``y_b = base(x_b) + s_{slot} (x_b @ A_{slot}) @ B_{slot}`` (from its invocation on, for an
  activated-LoRA slot), the output that row would have run alone with its adapter. The per-row factors are
  gathered (BGMV; see ``jlora._bank_kernels`` for the measured choice against rows grouped by adapter).

  Args:
    model: the unmodified flax.linen model (e.g. a ``jlora.models`` causal LM).
    params: its frozen params (the base every slot must belong to: fingerprinted once).
    *example_inputs: inputs for an abstract trace of ``model`` (finds the kernels' layouts).
    targets: a regex or regexes over parameter paths: the kernels slots may adapt (each slot any subset).
    slots: number of slots ``S``.
    max_rank: the largest rank a slot may have ``R`` (smaller ranks are zero-padded).
    max_invocation_length: the longest activated-LoRA invocation sequence a slot may have (0: no aLoRA slots;
      with more, the model's first input must be token ids ``(B, T)``).
    dtype: dtype of the slot factors.
    kernel: ``None`` (the measured choice per phase), ``"bgmv"`` or ``"sgmv"``.
    example_kwargs: keyword inputs for the trace.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Sequential([nn.Dense(8, name="up"), nn.relu, nn.Dense(4, name="down")])
    >>> x = jnp.ones((3, 6))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> bank = jlora.AdapterBank(model, params, x, targets=r".*/kernel", slots=4, max_rank=4)
    >>> lora = jlora.Lora(model, jlora.LoraConfig(targets=r"layers_0/kernel", rank=2))
    >>> adapters = jax.tree.map(lambda v: v + 0.1, lora.init(jax.random.key(1), params, x))
    >>> state = bank.insert(bank.init(), 2, adapters, lora.config)
    >>> y = bank.apply(params, state, x, adapter_ids=jnp.array([2, -1, 2]))
    >>> bool(jnp.allclose(y[0], lora.apply(params, adapters, x)[0], atol=1e-5))
    True
    >>> bool(jnp.allclose(y[1], model.apply({"params": params}, x)[1]))
    True
  """

  def __init__(self, model: nn.Module, params: Mapping, *example_inputs: Any, targets: str | Sequence[str],
               slots: int, max_rank: int, max_invocation_length: int = 0, dtype: Any = jnp.float32,
               kernel: str | None = None, example_kwargs: Mapping[str, Any] | None = None):
    for name, value, low in (("slots", slots, 1), ("max_rank", max_rank, 1),
                             ("max_invocation_length", max_invocation_length, 0)):
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise JloraError(f"AdapterBank: {name} must be an int >= {low}, got {value!r}.")
    if kernel is not None and kernel not in KERNELS:
      raise JloraError(f"AdapterBank: kernel must be None or one of {KERNELS}, got {kernel!r}.")
    self.model, self.params = model, params
    self.example_inputs, self.example_kwargs = example_inputs, dict(example_kwargs or {})
    self.slots, self.max_rank, self.max_invocation_length = slots, max_rank, max_invocation_length
    self.dtype, self.kernel = jnp.dtype(dtype), kernel
    self.targets: dict[str, Target] = Lora(model, LoraConfig(targets=targets, rank=max_rank)).trace(
        params, *example_inputs, **self.example_kwargs)
    if kernel == "sgmv":
      others = sorted(path for path, target in self.targets.items() if target.kind != "dense")
      if others:
        raise JloraError(f"AdapterBank(kernel='sgmv'): rows grouped by adapter are implemented for nn.Dense kernels; "
                         f"{others[:4]} are not. Use kernel=None or 'bgmv'.")
    self.base_fingerprint = fingerprint(params)
    self._stack_dims = tuple((path, len(target.stack_shape)) for path, target in self.targets.items())
    self._weight_norms: np.ndarray | None = None
    self._apply_fns: dict = {}

  # --- state ----------------------------------------------------------------------------------------

  def init(self) -> BankState:
    """An empty bank: every slot free (factors zero, scale 0), the base model for every row."""
    factors, scales, ranks = {}, {}, {}
    for path, target in self.targets.items():
      lead = target.stack_shape + (self.slots,)
      factors[tuple(path.split("/"))] = {"lora_a": jnp.zeros(lead + target.layout.a_shape(self.max_rank), self.dtype),
                                         "lora_b": jnp.zeros(lead + target.layout.b_shape(self.max_rank), self.dtype)}
      scales[path] = jnp.zeros((self.slots,), jnp.float32)
      ranks[path] = jnp.zeros((self.slots,), jnp.int32)
    return BankState(_paths.nest(factors), scales, ranks, jnp.zeros((self.slots,), jnp.float32),
                     jnp.full((self.slots, self.max_invocation_length), -1, jnp.int32),
                     jnp.zeros((self.slots,), jnp.int32), jnp.zeros((self.slots,), bool))

  def load(self, state: BankState, slot: int, path: str | os.PathLike, *, policy: LoadPolicy | None = None
           ) -> BankState:
    """A new state with ``slot`` holding the adapter saved at ``path`` (a jlora checkpoint or a PEFT directory).

    The adapter goes through its format's safe loader with ``policy`` (``jlora.load_adapters`` for a
    ``jlora_adapter.json`` directory, checked against the bank's base fingerprint; ``jlora.peft.
    from_pretrained_with_base`` for an ``adapter_config.json`` one, against its stored base fingerprint;
    genuine PEFT files need ``LoadPolicy(allow_missing_fingerprint=True)``), then the across-slot norm check.
    ``state`` itself is never modified; on any error the caller keeps it as it was.

    Raises:
      UnsafeAdapterError: anything the loader refuses (another base, a tampered file, ...), or (strict policy)
        a slot whose update norms stand out against the other slots'.
      JloraError: an adapter the bank cannot hold (DoRA; a kernel outside its targets; a rank above
        ``max_rank``; an invocation sequence longer than ``max_invocation_length``).
    """
    policy = policy or LoadPolicy()
    self._check_slot(slot)
    directory = pathlib.Path(os.fspath(path))
    if (directory / _JLORA_METADATA).is_file():
      adapters, config, variant_state = self._read_jlora(directory, policy)
    elif (directory / _PEFT_CONFIG).is_file():
      from jlora.peft import from_pretrained_with_base  # jlora.peft imports the core, not the other way round

      params, adapters, config = from_pretrained_with_base(directory, self.model, self.params, *self.example_inputs,
                                                           policy=policy)
      variant_state = (split_state(params)[1] or {}).get("vera")
    else:
      raise UnsafeAdapterError(f"{directory} holds neither a jlora adapter ({_JLORA_METADATA}) nor a PEFT adapter "
                               f"({_PEFT_CONFIG}).")
    return self._insert(state, slot, adapters, config, variant_state, policy, f"{directory} (slot {slot})",
                        checked=True)

  def insert(self, state: BankState, slot: int, adapters: Mapping, config: LoraConfig, *,
             params: Mapping | None = None, base_fingerprint: str | None = None,
             policy: LoadPolicy | None = None) -> BankState:
    """A new state with ``slot`` holding an adapter already in memory (trained here, or from ``jlora.combine``).

    The adapter is checked as a loaded one would be, short of the file checks: finite values, the tree its
    config describes, the base fingerprint when ``base_fingerprint`` is given, its own update-norm report and
    the across-slot one.

    Args:
      state: the bank's current state (not modified).
      slot: the slot to fill (a held adapter is replaced).
      adapters: the adapter tree (``jlora.Lora`` layout) and ``config`` its LoraConfig.
      params: the params it was made with, when they carry a variant's shared state (VeRA's projections);
        by default the bank's base.
      base_fingerprint: the fingerprint of the base the adapter was trained on; refused unless it is the bank's.
      policy: the norm thresholds and strictness.
    """
    policy = policy or LoadPolicy()
    self._check_slot(slot)
    if base_fingerprint is not None:
      check_base_fingerprint(base_fingerprint, self.base_fingerprint, policy, f"Adapter for bank slot {slot}",
                             "no fingerprint", "")
    check_finite(adapters, f"for bank slot {slot}")
    variant_state = (split_state(params)[1] or {}).get("vera") if params is not None else None
    return self._insert(state, slot, adapters, config, variant_state, policy, f"for bank slot {slot}", checked=False)

  def clear(self, state: BankState, slot: int) -> BankState:
    """A new state with ``slot`` free (its rows then get the base model)."""
    self._check_slot(slot)
    return _write_slot(self._stack_dims, state, jnp.int32(slot), self._empty_slot())

  def adapter(self, state: BankState, slot: int) -> tuple[dict, LoraConfig]:
    """The adapter in ``slot`` as an ordinary ``(adapters, LoraConfig)`` (LoRA, or activated LoRA), at its own ranks.

    ``jlora.Lora(model, config).apply(params, adapters, x)`` equals the slot's rows of ``apply``; use it to save or
    export adapters trained in the bank. A VeRA or AdaLoRA slot comes back in its LoRA form.
    """
    self._check_slot(slot)
    host = jax.device_get(state)
    if not host.occupied[slot]:
      raise JloraError(f"AdapterBank slot {slot} is empty.")
    adapters, ranks, alphas = {}, {}, {}
    for path, target in self.targets.items():
      rank = int(host.ranks[path][slot])
      if rank == 0:
        continue
      node = _paths.get(state.factors, tuple(path.split("/")))
      n = len(target.stack_shape)
      b_rank_axis = n + len(target.layout.batch_axes)
      adapters[tuple(path.split("/"))] = {
          "lora_a": jnp.take(node["lora_a"], slot, axis=n)[..., :rank],
          "lora_b": jax.lax.slice_in_dim(jnp.take(node["lora_b"], slot, axis=n), 0, rank, axis=b_rank_axis)}
      ranks[path], alphas[path] = rank, float(host.scales[path][slot]) * rank
    length = int(host.invocation_length[slot])
    first = next(iter(ranks))
    config = LoraConfig(targets=[re.escape(p) for p in ranks], rank=ranks[first], alpha=alphas[first],
                        dropout=float(host.dropout[slot]),
                        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != ranks[first]},
                        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alphas[first]},
                        dtype=self.dtype,
                        invocation_tokens=host.invocation[slot][:length].tolist() if length else None)
    return _paths.nest(adapters), config

  # --- applying -------------------------------------------------------------------------------------

  def inject(self, params: Mapping, state: BankState) -> dict:
    """The params tree the model sees: ``params`` plus every kernel's slot factors beside it (and the per-slot
    invocation sequences under ``"jlora:bank"``). Only dicts on the adapted paths are copied."""
    updates = {}
    for path, target in self.targets.items():
      keys = tuple(path.split("/"))
      node = _paths.get(state.factors, keys)
      scale = jnp.broadcast_to(state.scales[path], target.stack_shape + (self.slots,))
      updates[keys[:-1] + (BANK_PREFIX + keys[-1],)] = {**node, "scale": scale}
    updates[(BANK_KEY,)] = {"invocation": state.invocation, "invocation_length": state.invocation_length,
                            "dropout": state.dropout}
    return _paths.replace(params, updates)

  def apply(self, params: Mapping, state: BankState, *args, adapter_ids: jax.typing.ArrayLike,
            lora_dropout: bool | None = None, collections: Mapping[str, Any] | None = None, **kwargs) -> Any:
    """``model.apply`` with row ``b`` adapted by slot ``adapter_ids[b]`` (-1: the base model alone).

    Differentiable w.r.t. ``state.factors``: several adapters train at once, each on its own rows. Adapter
    dropout (each slot's rate) is on iff a ``"dropout"`` rng is passed, as in ``jlora.Lora.apply``.

    Args:
      params: the frozen base params.
      state: the bank state.
      *args: model inputs; the first leads with the batch axis (token ids ``(B, T)`` with aLoRA slots).
      adapter_ids: int ``(B,)``: each row's slot.
      lora_dropout: None (on iff a dropout rng is given), True or False.
      collections: other variable collections (``"cache"``, ...).
      **kwargs: passed to ``model.apply``.
    """
    variables = {**(collections or {}), "params": self.inject(params, state)}
    return run_bank(self.model, variables, args, kwargs, adapter_ids, lora_dropout=lora_dropout, kernel=self.kernel)

  def apply_fn(self, *, lora_dropout: bool | None = None):
    """``(variables, *args, adapter_ids, **kwargs) -> model.apply(...)`` with ``variables["params"] =
    bank.inject(params, state)``: one function per bank (so code that jits on its identity, such as
    ``jlora.models.generate(..., adapter_ids=...)``, compiles once whatever the slots hold)."""
    if lora_dropout not in self._apply_fns:

      def apply_bank(variables: Mapping, *args, adapter_ids: jax.typing.ArrayLike, **kwargs):
        return run_bank(self.model, variables, args, kwargs, adapter_ids, lora_dropout=lora_dropout,
                        kernel=self.kernel)

      self._apply_fns[lora_dropout] = apply_bank
    return self._apply_fns[lora_dropout]

  # --- norms ----------------------------------------------------------------------------------------

  def norm_report(self, state: BankState, policy: LoadPolicy | None = None) -> NormReport:
    """Every occupied slot's modules, each scored against the other slots' (``jlora._safety._norms_across``):
    an adapter whose update norms are outsized against the others stands out. Rows are ``"slot j: module"``."""
    policy = policy or LoadPolicy()
    reports, names = self._slot_reports(state, policy)
    return norms_across(reports, names, policy)

  def _slot_reports(self, state: BankState, policy: LoadPolicy) -> tuple[list[NormReport], list[str]]:
    modules = [m for path, target in self.targets.items() for m in
               ([path] if not target.stack_shape else [f"{path}[{i}]" for i in range(math.prod(target.stack_shape))])]
    weights = self._kernel_norms()
    updates = np.asarray(jax.device_get(_update_norms(tuple(self.targets.values()), state.factors, state.scales)),
                         np.float64)
    occupied = jax.device_get(state.occupied)
    slots = [j for j in range(self.slots) if occupied[j]]
    return [_summarise(modules, updates[j], weights, policy) for j in slots], [f"slot {j}" for j in slots]

  def _kernel_norms(self) -> np.ndarray:
    if self._weight_norms is None:
      kernels = [_paths.get(self.params, tuple(path.split("/"))) for path in self.targets]
      norms = _kernel_norms(tuple(self.targets.values()), kernels)
      self._weight_norms = np.concatenate([np.asarray(n, np.float64) for n in jax.device_get(norms)])
    return self._weight_norms

  # --- loading ----------------------------------------------------------------------------------------

  def _check_slot(self, slot: int) -> None:
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.slots:
      raise JloraError(f"AdapterBank: slot must be an int in 0..{self.slots - 1}, got {slot!r}.")

  def _read_jlora(self, directory: pathlib.Path, policy: LoadPolicy) -> tuple[dict, LoraConfig, Any]:
    from jlora._adapter_checkpoint import load_adapter_metadata, load_adapters

    config = load_adapter_metadata(directory, policy=policy)["lora_config"]
    lora = Lora(self.model, config)
    _refuse_unbankable(lora, str(directory))
    key = jax.random.key(0)
    if lora.variant.init_state is not None:  # VeRA: the config's seed rebuilds the shared projections
      params, target = jax.eval_shape(lambda p: lora.init_with_base(key, p, *self.example_inputs,
                                                                    **self.example_kwargs), self.params)
      targets = lora.trace(self.params, *self.example_inputs, **self.example_kwargs)
      variant_state = lora.variant.init_state(key, targets, config)
      params = {**self.params, STATE_KEY: {lora.variant.name: variant_state}}
    else:
      target = jax.eval_shape(lambda p: lora.init(key, p, *self.example_inputs, **self.example_kwargs), self.params)
      lora.trace(self.params, *self.example_inputs, **self.example_kwargs)
      params, variant_state = self.params, None
    adapters, config = load_adapters(directory, target, base_fingerprint=self.base_fingerprint, params=params,
                                     lora=lora, policy=policy)
    return adapters, config, variant_state

  def _insert(self, state: BankState, slot: int, adapters: Mapping, config: LoraConfig, variant_state: Any,
              policy: LoadPolicy, source: str, *, checked: bool) -> BankState:
    lora = Lora(self.model, config)
    _refuse_unbankable(lora, source)
    targets = lora.trace(self.params, *self.example_inputs, **self.example_kwargs)
    values = self._slot_values(lora, targets, adapters, config, variant_state, source)
    new_state = _write_slot(self._stack_dims, state, jnp.int32(slot), values)
    reports, names = self._slot_reports(new_state, policy)
    if not checked:  # the adapter's own report (a load path has run it): its slot's rows, from the exact LoRA form
      enforce_norms(reports[names.index(f"slot {slot}")], policy, source)
    if len(reports) > 1:
      enforce_norms(norms_across(reports, names, policy), policy, f"{source}, against the bank's other slots")
    return new_state

  def _empty_slot(self) -> dict:
    values = {"factors": {}, "scales": {}, "ranks": {}}
    for path, target in self.targets.items():
      values["factors"][path] = {"lora_a": jnp.zeros(target.stack_shape + target.layout.a_shape(self.max_rank),
                                                     self.dtype),
                                 "lora_b": jnp.zeros(target.stack_shape + target.layout.b_shape(self.max_rank),
                                                     self.dtype)}
      values["scales"][path], values["ranks"][path] = jnp.float32(0), jnp.int32(0)
    values.update(dropout=jnp.float32(0), invocation=jnp.full((self.max_invocation_length,), -1, jnp.int32),
                  invocation_length=jnp.int32(0), occupied=jnp.bool_(False))
    return values

  def _slot_values(self, lora: Lora, targets: Mapping[str, Target], adapters: Mapping, config: LoraConfig,
                   variant_state: Any, source: str) -> dict:
    values = self._empty_slot()
    outside = sorted(set(targets) - set(self.targets))
    if outside:
      raise JloraError(f"Adapter {source} adapts {outside[:8]}, which this AdapterBank was not built for: add them to "
                       f"its targets (it adapts {sorted(self.targets)[:8]}...).")
    for path, target in targets.items():
      mine = self.targets[path]
      if (target.layout, target.stack_shape) != (mine.layout, mine.stack_shape):
        raise JloraError(f"Adapter {source}: '{path}' is laid out as {target.stack_shape + target.layout.shape}, the "
                         f"bank's as {mine.stack_shape + mine.layout.shape} (scan_layers differs?).")
      keys = tuple(path.split("/"))
      if not _paths.contains(adapters, keys):
        raise JloraError(f"Adapter {source} has no adapter for its target '{path}'.")
      a, b, scale = _lora_form(lora, _paths.get(adapters, keys), target, variant_state)
      rank = a.shape[-1]
      if rank > self.max_rank:
        raise JloraError(f"Adapter {source} has rank {rank} on '{path}', above the bank's max_rank {self.max_rank}.")
      n_lead = len(target.stack_shape) + len(target.layout.batch_axes)
      pad_a = [(0, 0)] * (a.ndim - 1) + [(0, self.max_rank - rank)]
      pad_b = [(0, 0)] * b.ndim
      pad_b[n_lead] = (0, self.max_rank - rank)
      values["factors"][path] = {"lora_a": jnp.pad(jnp.asarray(a, self.dtype), pad_a),
                                 "lora_b": jnp.pad(jnp.asarray(b, self.dtype), pad_b)}
      values["scales"][path], values["ranks"][path] = jnp.float32(scale), jnp.int32(rank)
    tokens = config.invocation_tokens or ()
    if len(tokens) > self.max_invocation_length:
      raise JloraError(f"Adapter {source} is activated LoRA with an invocation sequence of {len(tokens)} tokens; this "
                       f"AdapterBank was built with max_invocation_length={self.max_invocation_length}.")
    invocation = np.full((self.max_invocation_length,), -1, np.int32)
    invocation[:len(tokens)] = tokens
    values.update(dropout=jnp.float32(config.dropout), invocation=jnp.asarray(invocation),
                  invocation_length=jnp.int32(len(tokens)), occupied=jnp.bool_(True))
    return values


def _refuse_unbankable(lora: Lora, source: str) -> None:
  if lora.variant is DORA:
    raise JloraError(f"Adapter {source} is DoRA, which an AdapterBank cannot hold: DoRA rescales every output feature "
                     "by m / ||W + s*A@B||, a column norm of each slot's merged kernel, which a mixed batch would have to "
                     "recompute for every slot in every call (or keep stale while training). Serve it alone "
                     "(jlora.Lora) or merged.")
  if lora.variant not in (LORA, ALORA, VERA, ADALORA):
    raise JloraError(f"Adapter {source} is a {lora.variant.name} adapter; an AdapterBank holds LoRA, activated LoRA, "
                     "VeRA and AdaLoRA adapters (in LoRA form).")


def _lora_form(lora: Lora, node: Mapping, target: Target, variant_state: Any) -> tuple[Any, Any, float]:
  """``(A, B, s)`` with ``update = s * A @ B`` exactly, in LoRA's layout (stack + batch + in + (r,), ...)."""
  if lora.variant is VERA:
    a, b = vera_factors(node, target, variant_state)
    return a, b, 1.0
  if lora.variant is ADALORA:
    return scaled_a(node, target), node["lora_b"], target.scale
  return node["lora_a"], node["lora_b"], target.scale


@jax.jit(static_argnums=0)
def _write_slot(stack_dims: tuple[tuple[str, int], ...], state: BankState, slot: jax.Array, values: dict) -> BankState:
  """``state`` with slot ``slot`` set to ``values``; ``stack_dims``: each kernel's number of stacked-layer axes."""
  def put(stacked, value, n_stack=0):
    return stacked.at[(slice(None),) * n_stack + (slot,)].set(value.astype(stacked.dtype))

  factors = _paths.nest({
      tuple(path.split("/")): {name: put(leaf, values["factors"][path][name], n_stack)
                               for name, leaf in _paths.get(state.factors, tuple(path.split("/"))).items()}
      for path, n_stack in stack_dims})
  return BankState(factors=factors,
                   scales={path: put(v, values["scales"][path]) for path, v in state.scales.items()},
                   ranks={path: put(v, values["ranks"][path]) for path, v in state.ranks.items()},
                   dropout=put(state.dropout, values["dropout"]),
                   invocation=put(state.invocation, values["invocation"]),
                   invocation_length=put(state.invocation_length, values["invocation_length"]),
                   occupied=put(state.occupied, values["occupied"]))


@jax.jit(static_argnums=0)
def _update_norms(targets: tuple, factors: dict, scales: dict) -> jax.Array:
  """``|s_j| ||A_j @ B_j||_F`` for every slot ``j`` and module (stacked layers unrolled): ``(S, modules)``."""
  columns = []
  for target in targets:
    node = _paths.get(factors, tuple(target.path.split("/")))
    n = len(target.stack_shape)
    a, b = jnp.moveaxis(node["lora_a"], n, 0), jnp.moveaxis(node["lora_b"], n, 0)
    norms = jax.vmap(lambda a1, b1, t=target: factor_norms(a1, b1, t))(a, b)  # (S,) + (layers,)
    columns.append(jnp.abs(scales[target.path])[:, None] * norms.reshape(norms.shape[0], -1))
  return jnp.concatenate(columns, axis=1)


def _kernel_norms(targets: tuple, kernels: list) -> list:
  """``||W||_F`` per stacked layer of every kernel (a quantized kernel counts as what it dequantizes to)."""
  out = []
  for target, kernel in zip(targets, kernels):
    w = kernel.dequantize(jnp.float32) if is_quantized(kernel) else jnp.asarray(kernel, jnp.float32)
    out.append(jnp.sqrt(jnp.sum(jnp.square(w).reshape(math.prod(target.stack_shape), -1), axis=1)))
  return out
