"""A kernel and its factors in canonical order: matrix views, per-feature column statistics, broadcasting back.

Any adapted kernel, whatever its module, is a batch of matrices ``(fan_in, fan_out)``: stacked-layer axes,
then the layout's batch axes, then the flattened input axes and the flattened output axes. A *feature*
is one ``(batch..., out...)`` index: its *column* is the kernel restricted to it, over every input axis.
The factors already live in that order (``A: stack + batch + in + (r,)``, ``B: stack + batch + (r,) + out``).
"""

import math
import string

import jax
import jax.numpy as jnp

from jlora._layout import KernelLayout

_HIGHEST = jax.lax.Precision.HIGHEST


def _letters(layout: KernelLayout, n_stack: int) -> tuple[str, str, str, str, str]:
  letters = iter(c for c in string.ascii_letters if c not in "rq")  # r, q: rank axes
  stack = "".join(next(letters) for _ in range(n_stack))
  batch = "".join(next(letters) for _ in layout.batch_axes)
  ins = "".join(next(letters) for _ in layout.in_axes)
  outs = "".join(next(letters) for _ in layout.out_axes)
  roles = dict(zip(layout.batch_axes + layout.in_axes + layout.out_axes, batch + ins + outs))
  native = stack + "".join(roles[axis] for axis in range(len(layout.shape)))
  return stack, batch, ins, outs, native


def n_stack(kernel: jax.Array, layout: KernelLayout) -> int:
  return kernel.ndim - len(layout.shape)


def column_stats(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, layout: KernelLayout
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per feature, without forming ``A @ B``: ``(||W||², <W, A@B>, ||A@B||²)``, each ``stack + batch + out``.

  ``||W + s A@B||² = w2 + 2 s cross + s² quad``. The cross term is a ``W^T A`` product (the size of the
  factors, not of the kernel) and the last term the ``r x r`` Gram of ``A`` against ``B``. Float32.
  """
  stack, batch, ins, outs, native = _letters(layout, n_stack(kernel, layout))
  kernel, lora_a, lora_b = (jnp.asarray(v, jnp.float32) for v in (kernel, lora_a, lora_b))
  head = stack + batch
  w2 = jnp.einsum(f"{native},{native}->{head}{outs}", kernel, kernel, precision=_HIGHEST)
  kernel_a = jnp.einsum(f"{native},{head}{ins}r->{head}{outs}r", kernel, lora_a, precision=_HIGHEST)
  cross = jnp.einsum(f"{head}{outs}r,{head}r{outs}->{head}{outs}", kernel_a, lora_b, precision=_HIGHEST)
  gram = jnp.einsum(f"{head}{ins}r,{head}{ins}q->{head}rq", lora_a, lora_a, precision=_HIGHEST)
  quad = jnp.einsum(f"{head}r{outs},{head}rq,{head}q{outs}->{head}{outs}", lora_b, gram, lora_b, precision=_HIGHEST)
  return w2, cross, quad


def column_norms(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
  """``||W[..., :, o]||`` over the input axes, per feature (``stack + batch + out``), in float32."""
  stack, batch, ins, outs, native = _letters(layout, n_stack(kernel, layout))
  kernel = jnp.asarray(kernel, jnp.float32)
  return jnp.sqrt(jnp.einsum(f"{native},{native}->{stack}{batch}{outs}", kernel, kernel, precision=_HIGHEST))


def to_native(features: jax.Array, layout: KernelLayout) -> jax.Array:
  """A per-feature array ``stack + batch + out`` laid out to broadcast against the kernel ``stack + native``."""
  n = features.ndim - len(layout.batch_axes) - len(layout.out_axes)
  stack, batch, ins, outs, native = _letters(layout, n)
  order = [c for c in native if c not in ins]
  moved = jnp.einsum(f"{stack}{batch}{outs}->{''.join(order)}", features)
  return jnp.expand_dims(moved, tuple(i for i, c in enumerate(native) if c in ins))


def matricize(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
  """The kernel as a batch of ``(fan_in, fan_out)`` matrices: ``stack + batch + (fan_in, fan_out)``."""
  stack, batch, ins, outs, native = _letters(layout, n_stack(kernel, layout))
  canonical = jnp.einsum(f"{native}->{stack}{batch}{ins}{outs}", kernel)
  lead = canonical.shape[:len(stack) + len(batch)]
  fan_out = math.prod(layout.shape[i] for i in layout.out_axes)
  return canonical.reshape(lead + (layout.fan_in, fan_out))


def from_matrix(matrix: jax.Array, layout: KernelLayout) -> jax.Array:
  """The inverse of ``matricize``: ``stack + batch + (fan_in, fan_out)`` back to ``stack + native``."""
  in_shape = tuple(layout.shape[i] for i in layout.in_axes)
  out_shape = tuple(layout.shape[i] for i in layout.out_axes)
  canonical = matrix.reshape(matrix.shape[:-2] + in_shape + out_shape)
  stack, batch, ins, outs, native = _letters(layout, matrix.ndim - 2 - len(layout.batch_axes))
  return jnp.einsum(f"{stack}{batch}{ins}{outs}->{native}", canonical)
