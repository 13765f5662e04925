"""jlora.sharding: FSDP and tensor parallelism over a named device mesh, for base params and adapters.

Shardings come from rules, ``(regex, PartitionSpec)`` pairs ``re.fullmatch``-ed against '/'-joined
parameter paths (first match wins), the same addressing as LoRA targets. The adapters and everything
that mirrors them (optimizer state) follow their kernels, so a jitted step with these
``in_shardings``/``out_shardings`` runs the unmodified model under GSPMD.

Public API:

* ``make_mesh(axes, devices=None)``: a mesh from ``{"data": -1, "fsdp": 1, "tensor": 1}``.
* ``rules_for(model)``: the default rules a model declares as ``partition_rules`` (every ``jlora.models``
  module does: FSDP over ``"fsdp"``, Megatron over ``"tensor"``); this package never imports the models.
* ``rules_from_config(pairs, defaults=())``: rules from ``(regex, spec-as-tuple)`` pairs, before ``defaults``.
* ``param_specs(params, rules, mesh)``: a ``PartitionSpec`` tree, checked against shapes and mesh.
* ``adapter_specs(adapters, specs, targets)``: specs of the LoRA factors from their kernels' specs.
* ``tree_shardings_like(tree, specs, mesh)``: ``NamedSharding``s for optimizer / train state.
* ``named(specs, mesh)``, ``shard(params, shardings)``: specs to shardings, and placing a tree.
* ``Rule``, ``Rules``: the rule types.

Loading a checkpoint straight into shards: ``jlora.models.from_pretrained(path, mesh=mesh, rules=rules)``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import models, sharding
  >>> model = models.LlamaForCausalLM(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
  ...                                                    num_hidden_layers=2, num_attention_heads=4))
  >>> mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  >>> specs = sharding.param_specs(shapes, sharding.rules_for(model), mesh)
  >>> specs["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  P(None, 'tensor', 'fsdp')
  >>> shardings = sharding.named(specs, mesh)   # for jax.jit(..., in_shardings=...) or sharding.shard(params, ...)
"""

from jlora.sharding._adapters import adapter_specs
from jlora.sharding._mesh import make_mesh
from jlora.sharding._rules import Rule, Rules, rules_for, rules_from_config
from jlora.sharding._specs import named, param_specs, shard
from jlora.sharding._state import tree_shardings_like

__all__ = [
    "Rule",
    "Rules",
    "adapter_specs",
    "make_mesh",
    "named",
    "param_specs",
    "rules_for",
    "rules_from_config",
    "shard",
    "tree_shardings_like",
]
