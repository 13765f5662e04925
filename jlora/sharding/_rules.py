"""Sharding rules: ``(regex, PartitionSpec)`` pairs over '/'-joined parameter paths, first match wins.

A model brings its own default rules as a ``partition_rules`` attribute (every ``jlora.models``
architecture does: FSDP over ``"fsdp"``, Megatron-style splits over ``"tensor"``), which
:func:`rules_for` reads; this layer knows nothing about the models. Configs add overrides in front of
them with :func:`rules_from_config`.
"""

import re
from collections.abc import Iterable, Sequence
from typing import Any

from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError

Rule = tuple[str, P]
Rules = tuple[Rule, ...]

_REPLICATED = P()


def rules_for(model: Any) -> Rules:
  """The default sharding rules a model declares as its ``partition_rules`` attribute.

  Every ``jlora.models`` module has them (``LlamaForCausalLM`` / ``LlamaModel`` for Llama, Mistral,
  Qwen2 and Gemma configs, ``GPT2LMHeadModel``, ``BertModel``): FSDP over ``"fsdp"``, Megatron-style
  column/row splits over ``"tensor"``, for stacked (``nn.scan``) or unrolled layers. A mesh without an
  ``"fsdp"`` or ``"tensor"`` axis cannot use these rules; give such axes size 1 to switch them off.
  Any other module can declare ``partition_rules`` the same way (a class attribute is enough).

  Args:
    model: a module with a ``partition_rules`` attribute: ``(regex, PartitionSpec or tuple)`` pairs.

  Returns:
    A tuple of ``(regex, PartitionSpec)`` rules for :func:`param_specs`.

  Raises:
    JloraError: ``model`` declares no ``partition_rules`` (write rules for it yourself), or they are malformed.

  Example:
    >>> from jlora import models, sharding
    >>> model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                                    num_hidden_layers=2, num_attention_heads=4))
    >>> dict(sharding.rules_for(model))[r"(?:.*/)?layers/self_attn/o_proj/kernel"]
    P(None, 'tensor', 'fsdp')
  """
  rules = getattr(model, "partition_rules", None)
  if rules is None:
    raise JloraError(f"{type(model).__name__} declares no default sharding rules (a partition_rules attribute, as "
                     "jlora.models modules have); write (regex, PartitionSpec) rules for its parameter paths.")
  return tuple((regex.pattern, spec) for regex, spec in compile_rules(rules))


def as_spec(spec: Any, where: str) -> P:
  """A ``PartitionSpec`` from a spec or a tuple/list of entries (``None``, an axis name, or a tuple of names)."""
  if isinstance(spec, P):
    return spec
  if spec is None:
    return _REPLICATED
  if isinstance(spec, str) or not isinstance(spec, Sequence):
    raise JloraError(f"{where}: a spec is a PartitionSpec or a tuple of entries (None, 'axis' or ('a', 'b')), "
                     f"one per dimension; got {spec!r}.")
  entries = []
  for entry in spec:
    if entry is None or isinstance(entry, str):
      entries.append(entry)
    elif isinstance(entry, Sequence) and all(isinstance(axis, str) for axis in entry):
      entries.append(tuple(entry))
    else:
      raise JloraError(f"{where}: spec entry {entry!r} of {spec!r} is not None, an axis name or a tuple of names.")
  return P(*entries)


def compile_rules(rules: Iterable[tuple[str, Any]]) -> list[tuple[re.Pattern, P]]:
  """Checks and compiles rules; specs may be PartitionSpecs or tuples."""
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
      raise JloraError(f"Sharding rule {i} is {rule!r}; a rule is a (regex, PartitionSpec) pair.")
    pattern, spec = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise JloraError(f"Sharding rule {i} has an invalid regex {pattern!r}: {e}.") from e
    compiled.append((regex, as_spec(spec, f"Sharding rule {i} ({pattern!r})")))
  return compiled


def rules_from_config(pairs: Iterable[Sequence[Any]], defaults: Iterable[Rule] = ()) -> Rules:
  """Rules from a config's list of ``(regex, spec-as-tuple)`` pairs, placed before ``defaults``.

  Since the first matching rule wins, these override the defaults for the paths they match. Tuples
  and lists are accepted everywhere (configs and command lines turn tuples into lists).

  Args:
    pairs: e.g. ``[(".*q_proj/kernel", (None, "fsdp", "tensor"))]``; an entry is ``None``, an axis
      name, or a tuple of axis names (the dimension is split over their product); ``()`` or ``None``
      replicates a parameter of any rank.
    defaults: rules that apply after these, typically ``rules_for(model)``.

  Returns:
    A tuple of ``(regex, PartitionSpec)`` rules.

  Raises:
    JloraError: a pair that is not ``(str, spec)``, an invalid regex or a malformed spec.

  Example:
    >>> from jlora import sharding
    >>> sharding.rules_from_config([(".*q_proj/kernel", [None, "fsdp", ["tensor", "data"]])])
    (('.*q_proj/kernel', P(None, 'fsdp', ('tensor', 'data'))),)
  """
  converted = tuple((regex.pattern, spec) for regex, spec in compile_rules(pairs))
  return converted + tuple((regex.pattern, spec) for regex, spec in compile_rules(defaults))
