"""Default sharding rules of ``jlora.models``, derived from each architecture's module names.

Every model class carries its rules as ``partition_rules``, which ``jlora.sharding.rules_for`` reads;
the sharding layer knows nothing about the models. The rules combine two kinds of parallelism over
named mesh axes:

* ``"fsdp"``: every large matrix is split along one axis (ZeRO-3 / FSDP); the compiler gathers it
  before use and reduce-scatters gradients.
* ``"tensor"``: Megatron-style. Column-parallel projections (q/k/v, gate/up, GPT-2 c_attn/c_fc, BERT
  query/key/value/intermediate) split their output axis, so their bias follows it; row-parallel ones
  (o/down, c_proj, BERT output denses) split their input axis, so the activations between a column and
  a row projection stay split and only the row projection's output is all-reduced.

Kernels are ``(in, out)``: column-parallel is ``P("fsdp", "tensor")``, row-parallel ``P("tensor", "fsdp")``.
Norm scales and biases and the biases of row-parallel projections are replicated (``P()``, which fits
any rank). Stacked (``nn.scan``) layers have a leading layer axis, which each rule leaves unsplit
(``None``): every per-layer rule comes twice, for ``layers/...`` (stacked, leading ``None``) and
``layers_3/...`` (unrolled). Every rule may match below a prefix (the model inside a larger tree).
"""

from collections.abc import Mapping

from jax.sharding import PartitionSpec as P

from jlora.models._transformer import LayerNames

Rules = tuple[tuple[str, P], ...]

_ANY = r"(?:.*/)?"  # the model may sit inside a larger params tree
_COLUMN = ("fsdp", "tensor")
_ROW = ("tensor", "fsdp")


def _layer_paths(names: LayerNames, post_norm: bool) -> tuple[list[str], list[str], list[str]]:
  """Column-parallel projections, row-parallel projections and norms of a layer (see ``LayerNames``)."""
  if post_norm:
    column = [f"{names.attention}/{names.heads}/{name}" for name in (names.q, names.k, names.v)]
    column.append(f"{names.mlp}/{names.up}")
    row = [f"{names.attention}/{names.output}/{names.o}", f"{names.output}/{names.down}"]
    norms = [f"{names.attention}/{names.output}/{names.norm_1}", f"{names.output}/{names.norm_2}"]
    return column, row, norms
  qkv = [names.qkv] if names.qkv is not None else [names.q, names.k, names.v]
  up = [names.up] if names.gate is None else [names.gate, names.up]
  column = [f"{names.attention}/{name}" for name in qkv] + [f"{names.mlp}/{name}" for name in up]
  return column, [f"{names.attention}/{names.o}", f"{names.mlp}/{names.down}"], [names.norm_1, names.norm_2]


def partition_rules(
    names: LayerNames, *, post_norm: bool, outside_layers: Mapping[str, P], stack: str | None = None
) -> Rules:
  """The rules of an architecture: its layers' from ``names``, then ``outside_layers`` (embeddings, heads).

  Args:
    names: the architecture's module names.
    post_norm: the layer layout (see ``LayerNames``).
    outside_layers: regex (relative to the model, e.g. ``"embed_tokens/embedding"``) -> spec.
    stack: path of the layer stack inside the model; None means ``names.layers``.

  Returns:
    ``(regex, PartitionSpec)`` rules for ``jlora.sharding.param_specs``.
  """
  stack = names.layers if stack is None else stack
  column, row, norms = _layer_paths(names, post_norm)
  rules = []

  def per_layer(rest: str, spec: tuple) -> None:
    rules.append((f"{_ANY}{stack}/{rest}", P(None, *spec)))
    rules.append((rf"{_ANY}{stack}_\d+/{rest}", P(*spec)))

  for path in column:
    per_layer(f"{path}/kernel", _COLUMN)
    per_layer(f"{path}/bias", ("tensor",))
  for path in row:
    per_layer(f"{path}/kernel", _ROW)
  for path in row + norms:
    rules.append((rf"{_ANY}{stack}(?:_\d+)?/{path}/(?:bias|scale)", P()))
  rules.extend((f"{_ANY}{regex}", spec) for regex, spec in outside_layers.items())
  return tuple(rules)
