"""VeRA (Kopiczko et al., 2024): one pair of frozen random projections for every kernel, two trained vectors each.

    y = base(x) + lambda_b ⊙ ((lambda_d ⊙ (dropout(x) @ A)) @ B),      no alpha scaling

as PEFT computes it (``peft.tuners.vera``). ``A`` (``vera_a``: ``(max_in, r)``) and ``B`` (``vera_b``:
``(r, max_out)``) are drawn once for all targeted kernels, sized to the largest fan-in and fan-out among
them, and each kernel uses their leading block: ``A[:fan_in]``, ``B[:, :fan_out]`` (PEFT's ``vera_A[:, :in]``
and ``vera_B[:out]``, transposed to jlora's ``(in, r)``/``(r, out)`` order). Multi-axis kernels
(``DenseGeneral``, ``Einsum``) use their flattened input and output axes; a kernel-batch axis gets its own
vectors per slice, over the same projections.

Trainable (the adapter tree): ``vera_lambda_b`` (the kernel's batch + output axes, starts at 0: the identity)
and ``vera_lambda_d`` (batch + ``(r,)``, starts at ``d_initial``). Frozen: the projections, the variant's
shared state ``params["jlora:state"]["vera"] = {"vera_a", "vera_b"}`` (``Lora.init_with_base`` adds it),
drawn from ``jax.random.key(config.projection_seed)`` with PEFT's distribution (kaiming-uniform with gain
``sqrt(2)``: ``U(±sqrt(6 / max_in))`` and ``U(±sqrt(6 / r))``). The config therefore rebuilds them; JAX
cannot replay torch's generator, so an adapter imported from PEFT keeps the projections its file stores.

Like PEFT, VeRA adapts linear maps only (``Dense``, ``DenseGeneral``, ``Einsum``): ``Conv`` and ``Embed``
kernels are refused.
"""

import math

import jax
import jax.numpy as jnp

from jlora._errors import JloraError
from jlora._targets import Target
from jlora._variant import Adapter, Call, LeafAxes, Variant
from jlora.variants._lora import factor_norms

LEAVES = ("vera_lambda_b", "vera_lambda_d")
REFUSED = ("conv", "embed")  # binding kinds PEFT has no VeRA for


def check_kind(target: Target) -> None:
  if target.kind in REFUSED:
    raise JloraError(f"VeRA cannot adapt '{target.path}', a {target.module_type} ({target.kind}) kernel: like PEFT's "
                     "VeRA (Linear and Conv1D layers only), jlora's adapts linear maps (Dense/Linear, DenseGeneral/"
                     "LinearGeneral, Einsum), no convolutions or embeddings. Exclude it from LoraConfig.targets.")


def fan_out(target: Target) -> int:
  return math.prod(target.layout.shape[i] for i in target.layout.out_axes)


def leaves(target: Target) -> LeafAxes:
  check_kind(target)
  layout = target.layout
  return {"vera_lambda_b": layout.batch_axes + layout.out_axes, "vera_lambda_d": layout.batch_axes + (None,)}


def init_state(key: jax.Array, targets, config) -> dict:
  """The shared projections, sized to the largest targeted fan-in and fan-out, from ``config.projection_seed``.

  ``key`` (the init key) is not used: the seed in the config alone rebuilds the projections.
  """
  del key
  targets = list(targets.values())
  for target in targets:
    check_kind(target)
  if not targets:
    raise JloraError("VeRA: no targeted kernels to size the shared projections for.")
  max_in = max(t.layout.fan_in for t in targets)
  max_out = max(fan_out(t) for t in targets)
  rank = config.rank
  key_a, key_b = jax.random.split(jax.random.key(config.projection_seed))
  # PEFT's _kaiming_init: U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in of the torch tensor).
  bound_a, bound_b = math.sqrt(6.0 / max_in), math.sqrt(6.0 / rank)
  return {"vera_a": jax.random.uniform(key_a, (max_in, rank), config.dtype, -bound_a, bound_a),
          "vera_b": jax.random.uniform(key_b, (rank, max_out), config.dtype, -bound_b, bound_b)}


def projections(state, target: Target) -> tuple[jax.Array, jax.Array]:
  """``(A[:fan_in] as in_shape + (r,), B[:, :fan_out] as (r,) + out_shape)``: the kernel's block of the projections."""
  if state is None or set(state) != {"vera_a", "vera_b"}:
    raise JloraError(f"VeRA adapter of '{target.path}': the shared projections params['jlora:state']['vera'] = "
                     "{'vera_a', 'vera_b'} are missing: Lora.init_with_base adds them to params, and Lora.merge leaves "
                     "them out of the merged params (to unmerge, pass {**merged, 'jlora:state': params['jlora:state']}).")
  vera_a, vera_b = state["vera_a"], state["vera_b"]
  layout, rank = target.layout, target.rank
  fan_in, out = layout.fan_in, fan_out(target)
  if vera_a.ndim != 2 or vera_b.ndim != 2 or vera_a.shape[1] != rank or vera_b.shape[0] != rank or (
      vera_a.shape[0] < fan_in or vera_b.shape[1] < out):
    raise JloraError(f"VeRA adapter of '{target.path}' (rank {rank}, fan-in {fan_in}, fan-out {out}) does not fit the "
                     f"shared projections vera_a {tuple(vera_a.shape)}, vera_b {tuple(vera_b.shape)}: they are "
                     "(max fan-in, r) and (r, max fan-out) over the targeted kernels.")
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  out_shape = tuple(layout.shape[i] for i in layout.out_axes)
  return vera_a[:fan_in].reshape(in_shape + (rank,)), vera_b[:, :out].reshape((rank,) + out_shape)


def factors(adapter: Adapter, target: Target, state) -> tuple[jax.Array, jax.Array]:
  """VeRA as LoRA factors: ``A[:fan_in] * lambda_d`` (``lead + in + (r,)``) and ``lambda_b * B[:, :fan_out]``
  (``lead + (r,) + out``), ``lead`` the stacked-layer and kernel-batch axes of the vectors."""
  a, b = projections(state, target)
  lambda_d, lambda_b = adapter["vera_lambda_d"], adapter["vera_lambda_b"]
  lead = lambda_d.shape[:-1]
  n_in = len(target.layout.in_axes)
  a = a.reshape((1,) * len(lead) + a.shape) * lambda_d.reshape(lead + (1,) * n_in + lambda_d.shape[-1:])
  b = b.reshape((1,) * len(lead) + b.shape) * jnp.expand_dims(lambda_b, len(lead))
  return a, b


def _init(key: jax.Array, target: Target, config, kernel: jax.Array) -> tuple[dict, jax.Array]:
  del key  # VeRA's randomness is its shared projections (init_state)
  check_kind(target)
  layout = target.layout
  lead = target.stack_shape + tuple(layout.shape[i] for i in layout.batch_axes)
  out_shape = tuple(layout.shape[i] for i in layout.out_axes)
  return {"vera_lambda_b": jnp.zeros(lead + out_shape, config.dtype),
          "vera_lambda_d": jnp.full(lead + (target.rank,), config.d_initial, config.dtype)}, kernel


def _apply(adapter: Adapter, call: Call) -> jax.Array:
  a, b = factors(adapter, call.target, call.state)
  base_out = call.base()
  return base_out + call.low_rank(a, b).astype(base_out.dtype)


def delta(adapter: Adapter, target: Target, state) -> jax.Array:
  """The update ``W' - W`` in float32, laid out like the kernel (stack axes kept)."""
  a, b = factors(adapter, target, state)
  return target.layout.delta(a.astype(jnp.float32), b.astype(jnp.float32))


def _merge(kernel: jax.Array, adapter: Adapter, target: Target, state=None):
  return (kernel.astype(jnp.float32) + delta(adapter, target, state)).astype(kernel.dtype), None


def _unmerge(kernel: jax.Array, adapter: Adapter, target: Target, state=None, memo=None) -> jax.Array:
  return (kernel.astype(jnp.float32) - delta(adapter, target, state)).astype(kernel.dtype)


def _update_norms(kernel: jax.Array, adapter: Adapter, target: Target, state=None) -> jax.Array:
  return factor_norms(*factors(adapter, target, state), target)


VERA = Variant(
    name="vera",
    leaf_names=LEAVES,
    leaves=leaves,
    init=_init,
    apply=_apply,
    merge=_merge,
    unmerge=_unmerge,
    update_norms=_update_norms,
    vector_leaves=LEAVES,
    init_state=init_state,
)
