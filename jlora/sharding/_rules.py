"""Sharding rules: ``(regex, PartitionSpec)`` pairs over '/'-joined parameter paths, first match wins.

The defaults for ``jlora.models`` combine two kinds of parallelism over named mesh axes:

* ``"fsdp"``: every large matrix is split along one axis (ZeRO-3 / FSDP); the compiler gathers it
  before use and reduce-scatters gradients.
* ``"tensor"``: Megatron-style. Column-parallel projections (q/k/v, gate/up, GPT-2 c_attn/c_fc, BERT
  query/key/value/intermediate) split their output axis, so their bias follows it; row-parallel ones
  (o/down, c_proj, BERT output denses) split their input axis, so the activations between a column and
  a row projection stay split and only the row projection's output is all-reduced.

Kernels are ``(in, out)``: column-parallel is ``P("fsdp", "tensor")``, row-parallel ``P("tensor", "fsdp")``.
Norm scales and the biases of row-parallel projections are replicated (``P()``, which fits any rank).
Stacked (``nn.scan``) layers have a leading layer axis, which each rule leaves unsplit (``None``):
every per-layer rule comes twice, for ``layers/...`` (stacked, leading ``None``) and ``layers_3/...``
(unrolled).
"""

import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
from jax.sharding import PartitionSpec as P

from jlora._errors import JloraError

Rule = tuple[str, P]
Rules = tuple[Rule, ...]

_ANY = r"(?:.*/)?"  # the model may sit inside a larger params tree
_COLUMN = ("fsdp", "tensor")
_ROW = ("tensor", "fsdp")
_REPLICATED = P()


def _per_layer(layers: str, rest: str, spec: tuple) -> list[Rule]:
  """The rule for one per-layer param, in its stacked (leading layer axis) and unrolled forms."""
  return [(f"{_ANY}{layers}/{rest}", P(None, *spec)), (rf"{_ANY}{layers}_\d+/{rest}", P(*spec))]


def _replicated_per_layer(layers: str, rest: str) -> list[Rule]:
  return [(rf"{_ANY}{layers}(?:_\d+)?/{rest}", _REPLICATED)]


def _llama_rules(config) -> Rules:
  rules = [
      *_per_layer("layers", "self_attn/(?:q_proj|k_proj|v_proj)/kernel", _COLUMN),
      *_per_layer("layers", "self_attn/(?:q_proj|k_proj|v_proj)/bias", ("tensor",)),
      *_per_layer("layers", "self_attn/o_proj/kernel", _ROW),
      *_per_layer("layers", "mlp/(?:gate_proj|up_proj)/kernel", _COLUMN),
      *_per_layer("layers", "mlp/(?:gate_proj|up_proj)/bias", ("tensor",)),
      *_per_layer("layers", "mlp/down_proj/kernel", _ROW),
      *_replicated_per_layer("layers", "(?:self_attn/o_proj|mlp/down_proj)/bias"),
      *_replicated_per_layer("layers", "(?:input_layernorm|post_attention_layernorm)/scale"),
      # Vocab-parallel embedding (the tied head's logits then come out split over the vocabulary).
      (f"{_ANY}embed_tokens/embedding", P("tensor", "fsdp")),
      (f"{_ANY}norm/scale", _REPLICATED),
      (f"{_ANY}lm_head/kernel", P("fsdp", "tensor")),
  ]
  return tuple(rules)


def _gpt2_rules(config) -> Rules:
  rules = [
      *_per_layer("h", "attn/c_attn/kernel", _COLUMN),
      *_per_layer("h", "attn/c_attn/bias", ("tensor",)),
      *_per_layer("h", "attn/c_proj/kernel", _ROW),
      *_per_layer("h", "mlp/c_fc/kernel", _COLUMN),
      *_per_layer("h", "mlp/c_fc/bias", ("tensor",)),
      *_per_layer("h", "mlp/c_proj/kernel", _ROW),
      *_replicated_per_layer("h", "(?:attn|mlp)/c_proj/bias"),
      *_replicated_per_layer("h", "(?:ln_1|ln_2)/(?:scale|bias)"),
      # GPT-2's vocabulary (50257) is odd, so the embeddings split the hidden axis, not the vocabulary.
      (f"{_ANY}(?:wte|wpe)/embedding", P(None, "fsdp")),
      (f"{_ANY}ln_f/(?:scale|bias)", _REPLICATED),
      (f"{_ANY}lm_head/kernel", P("fsdp", None)),
  ]
  return tuple(rules)


def _bert_rules(config) -> Rules:
  layer = "encoder/layer"
  rules = [
      *_per_layer(layer, "attention/self/(?:query|key|value)/kernel", _COLUMN),
      *_per_layer(layer, "attention/self/(?:query|key|value)/bias", ("tensor",)),
      *_per_layer(layer, "attention/output/dense/kernel", _ROW),
      *_per_layer(layer, "intermediate/dense/kernel", _COLUMN),
      *_per_layer(layer, "intermediate/dense/bias", ("tensor",)),
      *_per_layer(layer, "output/dense/kernel", _ROW),
      *_replicated_per_layer(layer, "(?:attention/output|output)/dense/bias"),
      *_replicated_per_layer(layer, "(?:attention/output|output)/LayerNorm/(?:scale|bias)"),
      # BERT's vocabulary (30522 = 2 * 3 * 5087) rarely divides a mesh axis: split the hidden axis.
      (f"{_ANY}embeddings/(?:word|position|token_type)_embeddings/embedding", P(None, "fsdp")),
      (f"{_ANY}embeddings/LayerNorm/(?:scale|bias)", _REPLICATED),
      (f"{_ANY}pooler/dense/kernel", P("fsdp", "tensor")),
      (f"{_ANY}pooler/dense/bias", P("tensor")),
  ]
  return tuple(rules)


def rules_for(model: nn.Module) -> Rules:
  """The default sharding rules of a ``jlora.models`` module (FSDP over ``"fsdp"``, Megatron over ``"tensor"``).

  Covers every parameter of ``LlamaForCausalLM`` / ``LlamaModel`` (Llama, Mistral, Qwen2 and Gemma
  configs, any bias/tying option), ``GPT2LMHeadModel`` and ``BertModel``, with stacked (``nn.scan``)
  or unrolled layers. A mesh without an ``"fsdp"`` or ``"tensor"`` axis cannot use these rules; give
  such axes size 1 to switch them off.

  Args:
    model: a module from ``jlora.models``.

  Returns:
    A tuple of ``(regex, PartitionSpec)`` rules for :func:`param_specs`.

  Raises:
    JloraError: ``model`` is not a ``jlora.models`` module (write rules for it yourself).

  Example:
    >>> from jlora import models, sharding
    >>> model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                                    num_hidden_layers=2, num_attention_heads=4))
    >>> dict(sharding.rules_for(model))[r"(?:.*/)?layers/self_attn/o_proj/kernel"]
    P(None, 'tensor', 'fsdp')
  """
  # Imported here: jlora.models imports jlora.sharding (sharded loading), not the other way round.
  from jlora import models  # pylint: disable=import-outside-toplevel

  config = getattr(model, "config", None)
  if isinstance(config, models.LlamaConfig):
    return _llama_rules(config)
  if isinstance(config, models.GPT2Config):
    return _gpt2_rules(config)
  if isinstance(config, models.BertConfig):
    return _bert_rules(config)
  raise JloraError(f"jlora.sharding has default rules for jlora.models modules only, not {type(model).__name__}; "
                   "write (regex, PartitionSpec) rules for its parameter paths.")


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
