"""KernelLayout: how a kernel's axes split into kernel-batch, input (contracted) and output axes.

Every adapted kernel, whatever module owns it, is described by one layout. The adapter factors live
in a canonical order, ``lora_a: stack + batch + in + (r,)`` and ``lora_b: stack + batch + (r,) + out``
(``stack`` being leading ``nn.scan``/``nn.vmap`` axes the module never sees), and the layout maps the
low-rank product back onto the kernel's own axis order for merging.
"""

import dataclasses
import math
import string

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """The roles of a kernel's axes, as indices into the kernel's own (native) shape.

  Attributes:
    shape: the kernel's shape as the module sees it (without stacked-layer axes).
    batch_axes: axes shared by input, kernel and output (``DenseGeneral.batch_dims``, an einsum
      letter present in all three operands): each slice gets its own low-rank factors.
    in_axes: axes contracted with the input.
    out_axes: axes that appear in the output.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  def __post_init__(self):
    axes = sorted(self.batch_axes + self.in_axes + self.out_axes)
    if axes != list(range(len(self.shape))):
      raise ValueError(f"axes {self} do not partition a kernel of rank {len(self.shape)}")

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[i] for i in self.in_axes)

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.batch_axes + self.in_axes) + (rank,)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.batch_axes) + (rank,) + tuple(self.shape[i] for i in self.out_axes)

  def delta(self, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``A @ B`` contracted over the rank and laid out like the kernel (leading stack axes kept).

    ``delta[..., i, o] = sum_r A[..., i, r] * B[..., r, o]``, then transposed to the kernel's order.
    """
    n_stack = lora_a.ndim - len(self.batch_axes) - len(self.in_axes) - 1
    letters = iter(string.ascii_letters)
    stack = "".join(next(letters) for _ in range(n_stack))
    batch = "".join(next(letters) for _ in self.batch_axes)
    ins = "".join(next(letters) for _ in self.in_axes)
    outs = "".join(next(letters) for _ in self.out_axes)
    rank = next(letters)
    canonical = stack + batch + ins + outs
    order = self.batch_axes + self.in_axes + self.out_axes
    native = stack + "".join(canonical[n_stack + order.index(axis)] for axis in range(len(self.shape)))
    return jnp.einsum(
        f"{stack}{batch}{ins}{rank},{stack}{batch}{rank}{outs}->{native}",
        lora_a,
        lora_b,
        precision=jax.lax.Precision.HIGHEST,
    )
