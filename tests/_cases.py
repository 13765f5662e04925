"""Small linen models, one per supported module kind, each with an independent numpy forward.

The numpy references re-derive ``base(x) + s * (x @ A) @ B`` by hand (plain einsums, explicit
convolution loops), sharing no code with jlora.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: nn.Module
  inputs: tuple
  targets: str
  # (params, adapters, scale, *inputs) -> expected output, all numpy
  reference: Callable
  method: str | None = None


def _np(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _ref_dense(p, a, s, x):
  p, a = _np(p), _np(a)
  w, b, la, lb = p["kernel"], p["bias"], a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  return x @ w + b + s * (x @ la) @ lb


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="proj")(x)


class OneDenseGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral((3, 2), axis=(-2, -1), name="proj")(x)


def _ref_dense_general(p, a, s, x):
  p, a = _np(p["proj"]), _np(a["proj"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  base = np.einsum("bij,ijkl->bkl", x, p["kernel"]) + p["bias"]
  return base + s * np.einsum("bij,ijr,rkl->bkl", x, la, lb)


class BatchedDenseGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(6, axis=-1, batch_dims=(0,), name="proj")(x)


def _ref_batched_dense_general(p, a, s, x):
  p, a = _np(p["proj"]), _np(a["proj"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  base = np.einsum("bti,bio->bto", x, p["kernel"]) + p["bias"][:, None, :]
  return base + s * np.einsum("bti,bir,bro->bto", x, la, lb)


class HeadsEinsum(nn.Module):
  """Kernel axes interleave output and input roles: (heads: out, d: in, head_dim: out)."""

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((2, 4, 3), "btd,ndh->btnh", name="proj")(x)


def _ref_heads_einsum(p, a, s, x):
  p, a = _np(p["proj"]), _np(a["proj"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  base = np.einsum("btd,ndh->btnh", x, p["kernel"]) + p["bias"]
  return base + s * np.einsum("btd,dr,rnh->btnh", x, la, lb)


class PerHeadEinsum(nn.Module):
  """A kernel axis shared by input, kernel and output (per-head projection)."""

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((3, 4, 5), "bnd,ndh->bnh", use_bias=False, name="proj")(x)


def _ref_per_head_einsum(p, a, s, x):
  p, a = _np(p["proj"]), _np(a["proj"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  return np.einsum("bnd,ndh->bnh", x, p["kernel"]) + s * np.einsum("bnd,ndr,nrh->bnh", x, la, lb)


class StridedConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), strides=2, padding="SAME", name="conv")(x)


def _np_conv_same_stride2(x, w):
  """2-D 'SAME' convolution with stride 2, NHWC x HWIO, by explicit loops."""
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  out_h, out_w = -(-h // 2), -(-wd // 2)
  pad_h = max((out_h - 1) * 2 + kh - h, 0)
  pad_w = max((out_w - 1) * 2 + kw - wd, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  y = np.zeros((n, out_h, out_w, o))
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, 2 * i : 2 * i + kh, 2 * j : 2 * j + kw, :]
      y[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
  return y


def _ref_conv(p, a, s, x):
  p, a = _np(p["conv"]), _np(a["conv"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  return _np_conv_same_stride2(x, p["kernel"]) + p["bias"] + s * _np_conv_same_stride2(x, la) @ lb


class TiedEmbed(nn.Module):
  """Embedding lookup followed by the tied output projection (``attend``).

  ``dtype`` is nn.Embed's compute dtype: None computes in the table's dtype (bfloat16 for a bf16 table).
  """

  dtype: Any = None

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(10, 6, dtype=self.dtype, name="embed")
    return embed.attend(jnp.tanh(embed(ids)))


def _ref_tied_embed(p, a, s, ids):
  p, a = _np(p["embed"]), _np(a["embed"])
  la, lb = a["embedding"]["lora_a"], a["embedding"]["lora_b"]
  table = p["embedding"] + s * la @ lb
  return np.tanh(table[ids]) @ table.T


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4, name="fc")(x)), None


class ScannedStack(nn.Module):
  """Three stacked layers through nn.scan with remat: params get a leading layer axis."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    length=3)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(2, name="head")(x)


def _ref_scanned(p, a, s, x):
  p, a = _np(p), _np(a)
  for i in range(3):
    w, b = p["layers"]["fc"]["kernel"][i], p["layers"]["fc"]["bias"][i]
    la, lb = a["layers"]["fc"]["kernel"]["lora_a"][i], a["layers"]["fc"]["kernel"]["lora_b"][i]
    x = np.tanh(x @ w + b + s * (x @ la) @ lb)
  head = p["head"]
  la, lb = a["head"]["kernel"]["lora_a"], a["head"]["kernel"]["lora_b"]
  return x @ head["kernel"] + head["bias"] + s * (x @ la) @ lb


class Ensemble(nn.Module):
  """nn.vmap over three independent Dense layers."""

  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=0, out_axes=0, axis_size=3)
    return dense(5, name="members")(x)


def _ref_ensemble(p, a, s, x):
  p, a = _np(p["members"]), _np(a["members"])
  la, lb = a["kernel"]["lora_a"], a["kernel"]["lora_b"]
  return np.stack([x[i] @ p["kernel"][i] + p["bias"][i] + s * (x[i] @ la[i]) @ lb[i] for i in range(3)])


def _rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


CASES = [
    Case("dense", OneDense(), (_rand((2, 3, 4), 0),), r"proj/kernel", lambda p, a, s, x: _ref_dense(p["proj"], a["proj"], s, x)),
    Case("dense_general", OneDenseGeneral(), (_rand((2, 4, 5), 1),), r"proj/kernel", _ref_dense_general),
    Case("dense_general_batch_dims", BatchedDenseGeneral(), (_rand((3, 2, 5), 2),), r"proj/kernel",
         _ref_batched_dense_general),
    Case("einsum_interleaved", HeadsEinsum(), (_rand((2, 3, 4), 3),), r"proj/kernel", _ref_heads_einsum),
    Case("einsum_per_head", PerHeadEinsum(), (_rand((2, 3, 4), 4),), r"proj/kernel", _ref_per_head_einsum),
    Case("conv", StridedConv(), (_rand((2, 7, 8, 3), 5),), r"conv/kernel", _ref_conv),
    Case("embed_tied", TiedEmbed(), (np.array([[1, 2, 3, 9, 0], [4, 4, 5, 6, 7]], np.int32),), r"embed/embedding",
         _ref_tied_embed),
    Case("scan_remat", ScannedStack(), (_rand((2, 4), 6),), r".*/kernel", _ref_scanned),
    Case("vmap", Ensemble(), (_rand((3, 2, 4), 7),), r"members/kernel", _ref_ensemble),
]


# --- every module kind inside the lifted transforms -----------------------------------------------------

LIFTED = 2  # layers of the scan, members of the vmap


class _ScanLayer(nn.Module):
  inner: type  # a one-module case model, built afresh in every layer

  @nn.compact
  def __call__(self, carry, x):
    return carry, self.inner(name="inner")(x)


class _VmapMember(nn.Module):
  inner: type

  @nn.compact
  def __call__(self, x):
    return self.inner(name="inner")(x)


class Lifted(nn.Module):
  """A case model stacked two ways: layers of ``nn.scan(nn.remat(...))`` (the first input broadcast to every
  layer) and members of ``nn.vmap`` (one input each); returns both outputs, each with a leading stack axis."""

  inner: type

  @nn.compact
  def __call__(self, x_members):
    scan = nn.scan(nn.remat(_ScanLayer), variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=LIFTED)
    _, per_layer = scan(self.inner, name="layers")(None, x_members[0])
    vmap = nn.vmap(_VmapMember, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0,
                   axis_size=LIFTED)
    return per_layer, vmap(self.inner, name="members")(x_members)


def _lifted(case: Case) -> Case:
  def layer(tree, i):
    return jax.tree.map(lambda v: v[i], tree)

  def reference(p, a, s, x_members):
    def params(stack, i):  # one layer's params, with the variants' shared state (VeRA's projections) if any
      return {**layer(p[stack]["inner"], i), **{k: v for k, v in p.items() if k == "jlora:state"}}

    per_layer = [case.reference(params("layers", i), layer(a["layers"]["inner"], i), s, x_members[0])
                 for i in range(LIFTED)]
    per_member = [case.reference(params("members", i), layer(a["members"]["inner"], i), s, x_members[i])
                  for i in range(LIFTED)]
    return np.stack(per_layer), np.stack(per_member)

  (x,) = case.inputs
  return Case(f"{case.name}_lifted", Lifted(type(case.model)), (np.stack([x, x[::-1]]),), ".*/" + case.targets,
              reference)


# Every module kind of CASES (not only Dense) inside nn.scan, nn.remat and nn.vmap.
LIFTED_CASES = [_lifted(c) for c in CASES if c.name not in ("scan_remat", "vmap")]


def assert_tolerance_rejects(want, wrong: dict, *, rtol: float, atol: float) -> None:
  """Each named wrong answer in ``wrong`` fails ``assert_allclose(wrong, want, rtol, atol)``.

  A test that runs this beside its real comparison shows that its tolerance tells right from those wrongs.
  """
  want = np.asarray(want, np.float64)
  for name, value in wrong.items():
    distance = np.abs(np.asarray(value, np.float64) - want)
    excess = np.where(np.isnan(distance), np.inf, distance) - (atol + rtol * np.abs(want))
    assert excess.max() > 0, f"{name} passes rtol={rtol}, atol={atol}: the tolerance cannot tell it from right"


# --- every variant of the family ----------------------------------------------------------------------------------

# The LoraConfig options that select each variant the conformance suite runs (DoRA; PiSSA/OLoRA start from the
# kernel and rewrite the base; every other option as in the LoRA suite).
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"},
            # VeRA: shared projections in params["jlora:state"]; AdaLoRA: the suite's rank (2) is its init_rank.
            "vera": {"variant": "vera"},
            "adalora": {"variant": "adalora", "init_rank": 2, "target_rank": 1, "total_step": 10}}
# Module kinds a variant refuses, as PEFT's does (VeRA: linear layers only; AdaLoRA: no embeddings).
REFUSED = {"vera": ("conv", "embed_tied"), "adalora": ("embed_tied",)}


def supports(case, variant) -> bool:
  """Whether ``variant`` adapts the module kind of ``case`` (a case name or a Case)."""
  name = getattr(case, "name", case)
  return name not in REFUSED.get(variant, ())


def _roles(layout, n_stack):
  """Einsum letters of a kernel's axes (stack, batch, in, out) and of its native order."""
  letters = iter("abcdefghijklmnopstuvwxyz")  # no r: the rank
  stack = "".join(next(letters) for _ in range(n_stack))
  batch, ins, outs = ("".join(next(letters) for _ in axes) for axes in (layout.batch_axes, layout.in_axes,
                                                                         layout.out_axes))
  role = dict(zip(layout.batch_axes + layout.in_axes + layout.out_axes, batch + ins + outs))
  return stack, batch, ins, outs, stack + "".join(role[i] for i in range(len(layout.shape)))


def np_delta(a, b, layout):
  """``A @ B`` over the rank, in the kernel's own axis order (float64 numpy; leading stack axes kept)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  stack, batch, ins, outs, native = _roles(layout, a.ndim - len(layout.batch_axes) - len(layout.in_axes) - 1)
  return np.einsum(f"{stack}{batch}{ins}r,{stack}{batch}r{outs}->{native}", a, b)


def np_dora_kernel(w, node, s, layout):
  """DoRA's merged kernel in float64 numpy: ``(m / ||W + s A@B||) ⊙ (W + s A@B)``, the norm per output feature
  over the kernel's input axes (``layout`` names them; leading stack axes are per-layer)."""
  w = np.asarray(w, np.float64)
  m = np.asarray(node["lora_magnitude"], np.float64)
  stack, batch, ins, outs, native = _roles(layout, w.ndim - len(layout.shape))
  v = w + s * np_delta(node["lora_a"], node["lora_b"], layout)
  norm = np.sqrt(np.einsum(f"{native},{native}->{stack}{batch}{outs}", v, v))
  g = np.einsum(f"{stack}{batch}{outs}->{''.join(c for c in native if c not in ins)}", m / norm)
  return v * np.expand_dims(g, tuple(i for i, c in enumerate(native) if c in ins))


def _set(tree, path, value):
  head, *rest = path
  return {**tree, head: _set(tree[head], rest, value) if rest else value}


def variant_reference(reference, variant, layouts):
  """The case's numpy reference for ``variant``: LoRA's own formula for LoRA and PiSSA/OLoRA (which differ only in
  where they start), and for DoRA the plain base formula on DoRA's merged kernels (``layouts``: ``{kernel path:
  KernelLayout}``, the paths relative to the case's params)."""
  if variant in ("vera", "adalora"):
    return _factored_reference(reference, variant, layouts)
  if variant != "dora":
    return reference

  def dora(p, a, s, *inputs):
    p = _np(p)
    for path, layout in layouts.items():
      keys = path.split("/")
      node, w = a, p
      for k in keys:
        node, w = node[k], w[k]
      p = _set(p, keys, np_dora_kernel(w, node, s, layout))
    return reference(p, a, 0.0, *inputs)

  return dora


def np_effective_factors(node, variant, layout, state=None):
  """A VeRA or AdaLoRA adapter as LoRA factors ``(A, B)`` (float64 numpy, leading stack axes kept), re-derived:

  * VeRA: ``A = vera_a[:fan_in] * lambda_d``, ``B = vera_b[:, :fan_out] * lambda_b`` (``state`` holds the
    projections ``vera_a`` ``(max_in, r)`` and ``vera_b`` ``(r, max_out)``);
  * AdaLoRA: ``A = lora_a * lora_e`` (the singular values scale the rank axis), ``B = lora_b``.
  """
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  out_shape = tuple(layout.shape[i] for i in layout.out_axes)
  if variant == "adalora":
    a, e = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_e"], np.float64)
    return a * e.reshape(e.shape[:-1] + (1,) * len(in_shape) + e.shape[-1:]), np.asarray(node["lora_b"], np.float64)
  d, b = np.asarray(node["vera_lambda_d"], np.float64), np.asarray(node["vera_lambda_b"], np.float64)
  rank, lead = d.shape[-1], d.shape[:-1]
  proj_a = np.asarray(state["vera_a"], np.float64)[:int(np.prod(in_shape))].reshape(in_shape + (rank,))
  proj_b = np.asarray(state["vera_b"], np.float64)[:, :int(np.prod(out_shape))].reshape((rank,) + out_shape)
  a = proj_a * d.reshape(lead + (1,) * len(in_shape) + (rank,))
  b = proj_b * b.reshape(lead + (1,) + out_shape)
  return a, b


def _factored_reference(reference, variant, layouts):
  """The case's LoRA reference on the variant's effective factors (``np_effective_factors``)."""

  def factored(p, a, s, *inputs):
    state = p.get("jlora:state", {}).get("vera")
    for path, layout in layouts.items():
      keys = path.split("/")
      node = a
      for k in keys:
        node = node[k]
      lora_a, lora_b = np_effective_factors(node, variant, layout, state)
      a = _set(a, keys, {"lora_a": lora_a, "lora_b": lora_b})
    return reference(p, a, s, *inputs)

  return factored
