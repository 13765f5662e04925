"""quantize / dequantize over a params tree: targets by regex, like ``LoraConfig.targets``."""

import re
from collections.abc import Sequence
from typing import Any

import jax

from jlora._errors import JloraError
from jlora._targets import near_misses
from jlora.quant._qarray import check_format, quantize_array
from jlora.quant._quantized import is_quantized


def leaf_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """'/'-joined paths and leaves of ``tree`` (quantized kernels are leaves), and its treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  paths = [jax.tree_util.keystr(keypath, simple=True, separator="/") for keypath, _ in flat]
  return paths, [leaf for _, leaf in flat], treedef


def _rules(targets: str | Sequence[str]) -> tuple[re.Pattern, ...]:
  rules = (targets,) if isinstance(targets, str) else tuple(targets)
  if not rules:
    raise JloraError("jlora.quant.quantize: targets is empty; give at least one regex over parameter paths.")
  compiled = []
  for rule in rules:
    try:
      compiled.append(re.compile(rule))
    except re.error as e:
      raise JloraError(f"jlora.quant.quantize: {rule!r} is not a valid regex: {e}") from None
  return tuple(compiled)


def quantize(params: Any, targets: str | Sequence[str], kind: str = "nf4", block_size: int = 64,
             double_quant: bool = True) -> Any:
  """``params`` with every targeted kernel replaced by its ``QuantizedArray``; other leaves are shared.

  Targets are regexes ``re.fullmatch``-ed against '/'-joined parameter paths, as in
  ``LoraConfig.targets`` (``layers/self_attn/q_proj/kernel``). A kernel ``lead + (in, out)`` is quantized
  as bitsandbytes quantizes the torch weight ``[out, in]``, one matrix per leading index, so stacked
  (``nn.scan``) layers are quantized per layer and the scan slices the quantized leaves like the kernel.
  Works under ``jax.eval_shape`` (the abstract tree is the restore target of a saved quantized base).

  Args:
    params: a params tree (nested dicts, as from ``model.init``).
    targets: a regex or a sequence of regexes; each must match at least one parameter.
    kind: ``"nf4"``, ``"fp4"`` (4-bit, two codes per byte) or ``"int8"``.
    block_size: elements per absmax block (64 as in QLoRA).
    double_quant: store the block statistics in 8 bits (QLoRA's double quantization).

  Returns:
    A tree of the same structure with ``QuantizedArray`` leaves at the targeted paths.

  Raises:
    JloraError: a rule matches no parameter (near misses are listed), or a match is not a floating
      kernel of rank >= 2, is quantized already, or holds NaN/inf.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jlora import quant
    >>> model = nn.Sequential([nn.Dense(128, name="up"), nn.relu, nn.Dense(64, name="down")])
    >>> x = jnp.ones((2, 64))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> qparams = quant.quantize(params, r".*/kernel")
    >>> qparams["layers_0"]["kernel"].codes.shape, qparams["layers_0"]["kernel"].shape
    ((128, 32), (64, 128))
    >>> y = quant.apply(model, qparams, x)   # each kernel dequantized inside its module's call
    >>> bool(jnp.allclose(y, model.apply({"params": quant.dequantize(qparams)}, x)))
    True
  """
  rules = _rules(targets)
  check_format(kind, block_size)
  paths, leaves, treedef = leaf_paths(params)
  for rule in rules:
    if not any(rule.fullmatch(p) for p in paths):
      hint = near_misses(rule.pattern, paths)
      raise JloraError(f"jlora.quant.quantize: rule {rule.pattern!r} matches no parameter path (rules are "
                       f"re.fullmatch-ed against '/'-joined paths such as {paths[0]!r}). "
                       + (f"Near misses: {hint}." if hint else f"Some paths: {paths[:8]}."))
  out = []
  for path, leaf in zip(paths, leaves):
    if any(rule.fullmatch(path) for rule in rules):
      if is_quantized(leaf):
        raise JloraError(f"jlora.quant.quantize: '{path}' is quantized already; narrow the targets.")
      try:
        leaf = quantize_array(leaf, kind, block_size, double_quant)
      except JloraError as e:
        raise JloraError(f"jlora.quant.quantize: '{path}': {e} Narrow the targets to the kernels.") from None
    out.append(leaf)
  return treedef.unflatten(out)


def dequantize(tree: Any, dtype: Any = None) -> Any:
  """``tree`` with every quantized kernel replaced by its float kernel (in its own dtype, or ``dtype``).

  Also takes a single quantized kernel. Under ``jax.jit`` this is where the float kernels come to exist;
  a model given quantized params (``jlora.Lora.apply``, ``jlora.quant.apply``) never calls it on the tree.
  """
  return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def logical_shapes(tree: Any) -> Any:
  """``tree`` with every quantized kernel replaced by a ``jax.ShapeDtypeStruct`` of its float kernel."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)
