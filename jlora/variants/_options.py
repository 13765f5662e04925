"""The options of VeRA and AdaLoRA in ``LoraConfig``: their PEFT defaults, and what each variant allows.

A variant's options are ``None`` in configs of other variants (and absent from their ``to_dict``); a config
of the variant gets PEFT's default for every option it leaves ``None``, so ``to_dict`` records the values
the adapter was made with. Options that change nothing for a variant, or that PEFT's variant ignores
(AdaLoRA ignores ``alpha_pattern`` and rsLoRA, VeRA has no alpha at all), are refused rather than ignored.
"""

import math
from typing import Any

from jlora._errors import JloraError

# PEFT's VeraConfig names and defaults (``projection_seed`` is PEFT's ``projection_prng_key``).
VERA_OPTIONS = {"projection_seed": 0, "d_initial": 0.1, "save_projection": True}
# PEFT's AdaLoraConfig names and defaults (``init_rank``: ``init_r``, ``target_rank``: ``target_r``,
# ``delta_t``: ``deltaT``); ``total_step`` has no default (PEFT requires it too).
ADALORA_OPTIONS = {"init_rank": 12, "target_rank": 8, "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85,
                   "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": None}
OPTIONS = {"vera": VERA_OPTIONS, "adalora": ADALORA_OPTIONS}
ALL_OPTIONS = tuple(name for options in OPTIONS.values() for name in options)
# A plain-LoRA option left at this value is "not set" (LoraConfig's defaults).
_LORA_DEFAULTS = {"rank": 8, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
                  "init": "kaiming_uniform"}
_UNUSED = {"vera": ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init"),
           "adalora": ("rank", "alpha_pattern", "use_rslora", "use_dora", "init")}
_WHY = {
    "vera": "VeRA has one rank r for its shared projections and no alpha scaling (PEFT's VeraConfig)",
    "adalora": "AdaLoRA's rank is init_rank (rank may only repeat it; the ranks it prunes to go to rank_pattern), its scale alpha / init_rank, "
               "and A, B start at N(0, 0.02), E at 0 (PEFT's AdaLoraConfig ignores r, alpha_pattern and rsLoRA)",
}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fill_options(config) -> None:
  """Sets PEFT's default for every ``None`` option of ``config.variant`` and checks every variant's options.

  Called from ``LoraConfig.__post_init__`` (``config`` is frozen: values are set with ``object.__setattr__``).

  Raises:
    JloraError: another variant's option is set, an option is out of range, or a LoRA option the variant
      does not have is set.
  """
  own = OPTIONS.get(config.variant, {})
  foreign = [name for name in ALL_OPTIONS if name not in own and getattr(config, name) is not None]
  if foreign:
    raise JloraError(f"LoraConfig: {foreign} are options of another variant than variant={config.variant!r} "
                     f"({ {v: list(o) for v, o in OPTIONS.items()} }).")
  for name, default in own.items():
    if getattr(config, name) is None:
      object.__setattr__(config, name, default)
  if config.variant in _UNUSED:
    set_here = [name for name in _UNUSED[config.variant] if getattr(config, name) != _LORA_DEFAULTS[name]
                and not (name == "rank" and config.rank == config.init_rank)]  # rank, if given, is init_rank
    if set_here:
      raise JloraError(f"LoraConfig(variant={config.variant!r}) does not take {set_here}: {_WHY[config.variant]}.")
  if config.variant == "vera":
    _check_vera(config)
  elif config.variant == "adalora":
    _check_adalora(config)


def _check_vera(config) -> None:
  if not _is_int(config.projection_seed) or not 0 <= config.projection_seed < 2**63:
    raise JloraError(f"LoraConfig.projection_seed must be an int in [0, 2**63), got {config.projection_seed!r}.")
  if not _is_number(config.d_initial):
    raise JloraError(f"LoraConfig.d_initial must be a finite number, got {config.d_initial!r}.")
  if not isinstance(config.save_projection, bool):
    raise JloraError(f"LoraConfig.save_projection must be True or False, got {config.save_projection!r}.")


def _check_adalora(config) -> None:
  for name in ("init_rank", "delta_t", "total_step"):
    value = getattr(config, name)
    if not _is_int(value) or value < 1:
      hint = " (AdaLoRA's budget schedule needs the number of training steps)" if name == "total_step" else ""
      raise JloraError(f"LoraConfig.{name} must be a positive int, got {value!r}{hint}.")
  for name in ("target_rank", "tinit", "tfinal"):
    value = getattr(config, name)
    if not _is_int(value) or value < 0:
      raise JloraError(f"LoraConfig.{name} must be a non-negative int, got {value!r}.")
  if config.target_rank >= config.init_rank:
    raise JloraError(f"LoraConfig.target_rank ({config.target_rank}) must be below init_rank ({config.init_rank}): "
                     "AdaLoRA prunes the initial budget down to the target.")
  too_large = {rule: rank for rule, rank in config.rank_pattern.items() if rank > config.init_rank}
  if too_large:
    raise JloraError(f"LoraConfig.rank_pattern {too_large}: an AdaLoRA adapter's ranks are pruned from init_rank "
                     f"({config.init_rank}), never above it.")
  if config.tinit >= config.total_step - config.tfinal:
    raise JloraError(f"LoraConfig: tinit={config.tinit}, tfinal={config.tfinal} and total_step={config.total_step} "
                     "leave no budgeting phase (tinit must be below total_step - tfinal).")
  for name in ("beta1", "beta2"):
    value = getattr(config, name)
    if not _is_number(value) or not 0 < value < 1:
      raise JloraError(f"LoraConfig.{name} must be in (0, 1), got {value!r}.")
  if not _is_number(config.orth_reg_weight) or config.orth_reg_weight < 0:
    raise JloraError(f"LoraConfig.orth_reg_weight must be a non-negative number, got {config.orth_reg_weight!r}.")
  if not _is_number(config.alpha) or config.alpha <= 0:
    raise JloraError(f"LoraConfig(variant='adalora').alpha must be positive, got {config.alpha!r} (PEFT scales by "
                     "init_r instead of a non-positive alpha, and then by each pruned rank: not supported).")
