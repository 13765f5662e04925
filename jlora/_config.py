"""LoraConfig: which kernels get adapters, of what rank and scale."""

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jlora._errors import JloraError

RANDOM_INITS = ("kaiming_uniform", "gaussian")


def niter_of(init: str) -> int | None:
  """``K`` of ``init="pissa_niter_K"`` (a non-negative int), else None."""
  head, sep, tail = init.partition("_niter_")
  if head == "pissa" and sep and tail.isdigit() and str(int(tail)) == tail:
    return int(tail)
  return None


def is_base_rewriting(init: str) -> bool:
  """Whether ``init`` starts the adapter from the kernel and leaves the residual as the frozen base."""
  return init in ("pissa", "olora") or niter_of(init) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how.

  Targets are regexes ``re.fullmatch``-ed against '/'-joined parameter paths of the model's
  ``params`` tree, e.g. ``layers_0/attn/q_proj/kernel``; stacked (``nn.scan``) layers have a single
  path such as ``layers/attn/q_proj/kernel``. Every rule must match at least one parameter.

  The adapted output is ``y = base(x) + s * (dropout(x) @ A) @ B`` with ``s = alpha / rank``
  (``alpha / sqrt(rank)`` with ``use_rslora``). The config carries the variant too (``use_dora``,
  ``variant``, PiSSA/OLoRA through ``init``), so ``jlora.Lora(model, config)`` rebuilds any adapter from a
  saved config alone; names follow PEFT's ``LoraConfig`` where PEFT has them.

  Attributes:
    targets: a regex or a sequence of regexes over parameter paths.
    rank: the LoRA rank ``r``.
    alpha: the LoRA alpha; the scale is ``alpha / rank``.
    dropout: dropout rate applied to the adapter's input (never to the frozen path); active only
      when ``Lora.apply`` is given a ``dropout`` rng.
    use_rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA).
    rank_pattern: ``{regex: rank}`` overrides; the first regex that fullmatches a path wins.
    alpha_pattern: ``{regex: alpha}`` overrides; the first regex that fullmatches a path wins.
    init: how ``A`` and ``B`` start. ``"kaiming_uniform"`` (PEFT's default: uniform with bound
      ``1/sqrt(fan_in)``) or ``"gaussian"`` (normal with std ``1/rank``, PEFT's ``init_lora_weights=
      "gaussian"``), both with ``B = 0`` so an initialised adapter is the identity; or from the kernel:
      ``"pissa"`` (its top-``r`` singular directions), ``"pissa_niter_K"`` (the same by a randomized SVD
      with ``K`` subspace iterations), ``"olora"`` (its QR factors), which leave the residual ``W - s·A@B``
      as the frozen base (``Lora.init_with_base`` returns it) so the output at init is unchanged.
    dtype: dtype of the adapter leaves (float32 by default, also when the base is bf16).
    use_dora: DoRA: a trained magnitude per output feature on top of LoRA's direction (see
      ``jlora.variants.DORA``).
    variant: the adapter family, ``"lora"`` (LoRA, and DoRA with ``use_dora``), ``"vera"`` (VeRA: ``rank``
      is its ``r``; no alpha) or ``"adalora"`` (AdaLoRA: ``init_rank`` is its rank, ``alpha / init_rank`` its
      scale); see ``jlora.variants.VARIANTS`` for the registered names.
    projection_seed, d_initial, save_projection: VeRA's options (PEFT's ``projection_prng_key``,
      ``d_initial``, ``save_projection``; defaults 0, 0.1, True): the seed of the shared random projections
      (drawn by jax), the initial ``lambda_d``, and whether a PEFT export stores the projections.
    init_rank, target_rank, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight, total_step: AdaLoRA's
      options (PEFT's ``init_r``, ``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
      ``orth_reg_weight``, ``total_step``; defaults 12, 8, 0, 0, 1, 0.85, 0.85, 0.5, and ``total_step`` is
      required): see ``jlora.adalora_allocator`` and ``jlora.adalora_orth_loss``.
    invocation_tokens: activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): the token ids of the
      invocation sequence. The adapter acts from the start of the sequence's last occurrence in each row to
      the end of the row, and not before, so the base model's KV cache of everything before it stays valid
      (``jlora.variants.ALORA``; ``jlora.invocation_starts``). None: an ordinary adapter.
    The options of a variant are None in configs of the others; see ``jlora.variants._options``.

  Example:
    >>> import jlora
    >>> config = jlora.LoraConfig(targets=r".*/(q_proj|v_proj)/kernel", rank=8, alpha=16.0)
    >>> config.scale_for("layers/attn/q_proj/kernel", config.rank_for("layers/attn/q_proj/kernel"))
    2.0
  """

  targets: str | Sequence[str]
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  use_rslora: bool = False
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  init: str = "kaiming_uniform"
  dtype: jnp.dtype = jnp.float32
  use_dora: bool = False
  variant: str = "lora"
  projection_seed: int | None = None
  d_initial: float | None = None
  save_projection: bool | None = None
  init_rank: int | None = None
  target_rank: int | None = None
  tinit: int | None = None
  tfinal: int | None = None
  delta_t: int | None = None
  beta1: float | None = None
  beta2: float | None = None
  orth_reg_weight: float | None = None
  total_step: int | None = None
  invocation_tokens: Sequence[int] | None = None

  def __post_init__(self):
    rules = self.target_rules
    if not rules:
      raise JloraError("LoraConfig.targets is empty: give at least one regex over parameter paths.")
    for rule in rules + tuple(self.rank_pattern) + tuple(self.alpha_pattern):
      try:
        re.compile(rule)
      except re.error as e:
        raise JloraError(f"LoraConfig: {rule!r} is not a valid regex: {e}") from None
    for where, rank in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
      if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise JloraError(f"LoraConfig.{where} must be a positive int, got {rank!r}.")
    for where, alpha in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
      if not _is_real(alpha) or not math.isfinite(alpha):
        raise JloraError(f"LoraConfig.{where} must be a finite number, got {alpha!r}.")
    if not isinstance(self.use_rslora, bool):
      raise JloraError(f"LoraConfig.use_rslora must be True or False, got {self.use_rslora!r}.")
    if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
      raise JloraError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
    if not isinstance(self.init, str) or not (self.init in RANDOM_INITS or is_base_rewriting(self.init)):
      raise JloraError(f"LoraConfig.init must be one of {list(RANDOM_INITS)}, 'pissa', 'pissa_niter_K' (K a "
                       f"non-negative int) or 'olora'; got {self.init!r}.")
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise JloraError(f"LoraConfig.dtype must be a floating dtype, got {self.dtype!r}.")
    if not isinstance(self.use_dora, bool):
      raise JloraError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}.")
    if self.invocation_tokens is not None:
      tokens = self.invocation_tokens
      if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not tokens or not all(
          isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise JloraError(f"LoraConfig.invocation_tokens must be a non-empty sequence of token ids (ints >= 0), "
                         f"got {tokens!r}.")
      object.__setattr__(self, "invocation_tokens", tuple(int(t) for t in tokens))
    from jlora.variants import variant_for  # the registry imports the config type
    from jlora.variants._options import fill_options

    variant_for(self)
    fill_options(self)

  def to_dict(self) -> dict:
    """A JSON-serialisable dict; ``LoraConfig.from_dict`` inverts it."""
    out = dataclasses.asdict(self)
    out["targets"] = list(self.target_rules) if not isinstance(self.targets, str) else self.targets
    out["rank_pattern"], out["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
    out["dtype"] = jnp.dtype(self.dtype).name
    from jlora.variants._options import ALL_OPTIONS

    for name in ALL_OPTIONS:  # another variant's options: absent (from_dict gives None back)
      if out[name] is None:
        del out[name]
    if self.invocation_tokens is None:  # an ordinary adapter: its saved config has no aLoRA field
      del out["invocation_tokens"]
    else:
      out["invocation_tokens"] = list(self.invocation_tokens)
    return out

  @classmethod
  def from_dict(cls, data: Mapping) -> "LoraConfig":
    """Builds a config from ``to_dict`` output; unknown keys are an error, not ignored."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
      raise JloraError(f"LoraConfig.from_dict: unknown keys {unknown}; known: {sorted(fields)}.")
    data = dict(data)
    if "dtype" in data:
      data["dtype"] = jnp.dtype(data["dtype"])
    return cls(**data)

  @property
  def rewrites_base(self) -> bool:
    """Whether init also rewrites the frozen base (PiSSA/OLoRA's residual): see ``Lora.init_with_base``."""
    return is_base_rewriting(self.init)

  @property
  def target_rules(self) -> tuple[str, ...]:
    return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

  def matches(self, path: str) -> bool:
    """Whether any target rule fullmatches ``path``."""
    return any(re.fullmatch(rule, path) for rule in self.target_rules)

  def rank_for(self, path: str) -> int:
    """The rank for the kernel at ``path``: the first matching ``rank_pattern``, else ``rank`` (AdaLoRA:
    ``init_rank``)."""
    return _first_match(self.rank_pattern, path, self.init_rank if self.variant == "adalora" else self.rank)

  def alpha_for(self, path: str) -> float:
    """The alpha for the kernel at ``path``: the first matching ``alpha_pattern``, else ``alpha``."""
    return float(_first_match(self.alpha_pattern, path, self.alpha))

  def scale_for(self, path: str, rank: int) -> float:
    """``s`` for the kernel at ``path`` whose adapter has rank ``rank``.

    VeRA has no scale (1.0). AdaLoRA's is PEFT's ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` the
    initial rank, also after pruning to ``rank``.
    """
    if self.variant == "vera":
      return 1.0
    if self.variant == "adalora":
      return self.alpha / (self.init_rank + 1e-5)
    alpha = self.alpha_for(path)
    return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _first_match(pattern: Mapping, path: str, default):
  for rule, value in pattern.items():
    if re.fullmatch(rule, path):
      return value
  return default


def _is_real(value) -> bool:
  """A real number given as one (not a bool, a string or an array)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)
