"""Codebooks: the value tables behind the 4-bit codes (NF4, FP4) and the signed dynamic 8-bit map, and
rounding a scaled value to its nearest level.

The tables are bitsandbytes' formats, value for value: a code written here means what it means there.
Rounding is to the nearest level, a value exactly between two levels taking the lower one (a value is
compared with the float32 midpoints of adjacent levels and counts the midpoints strictly below it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# NF4 (Dettmers et al., QLoRA, 2023): 16 quantiles of N(0, 1) with an exact zero, scaled to [-1, 1].
# Code i is the i-th smallest level.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)

# FP4 as bitsandbytes lays it out: bit 3 is the sign, and the three low bits select these magnitudes
# (a subnormal pair, then three exponents with one mantissa bit each), normalised by the largest, 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def _fp4_levels() -> np.ndarray:
  magnitudes = np.asarray(_FP4_MAGNITUDES, np.float32) / np.float32(12.0)
  return np.concatenate([magnitudes, -magnitudes])


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """``num`` float32 points from ``start`` to ``stop``: the first half counted up from ``start``, the rest
  down from ``stop``, each rounded once from the exact ``start + k * step`` (float32 ``start`` and ``step``)."""
  start32, stop32 = np.float32(start), np.float32(stop)
  step = np.float64((stop32 - start32) / np.float32(num - 1))
  points = [np.float64(start32) + step * k if k < num // 2 else np.float64(stop32) - step * (num - 1 - k)
            for k in range(num)]
  return np.asarray(points, np.float64).astype(np.float32)


def _dynamic_map() -> np.ndarray:
  """The signed 8-bit dynamic map (Dettmers, 8-bit approximations, 2016): for each of 7 decades
  ``10^(e-6)``, the ``2^e`` midpoints of ``2^e + 1`` evenly spaced points in [0.1, 1], with both signs;
  plus 0 and 1; sorted. Every step is float32 arithmetic."""
  values = [0.0, 1.0]
  for e in range(7):
    bounds = _linspace_f32(0.1, 1.0, 2**e + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    decade = np.float32(10.0 ** (e - 6))  # the products are rounded to float32
    values += list(decade * means) + list(-decade * means)
  return np.sort(np.asarray(values, np.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """A code's levels and how values round to them.

  Attributes:
    name: the format's name.
    levels: float32 value of each code (indexed by code).
    order: the codes sorted by value (a stable sort, so of two equal levels the lower code comes first).
    midpoints: float32 midpoints of adjacent sorted levels.
  """

  name: str
  levels: np.ndarray
  order: np.ndarray
  midpoints: np.ndarray

  @classmethod
  def of(cls, name: str, levels: np.ndarray) -> "Codebook":
    levels = np.asarray(levels, np.float32)
    order = np.argsort(levels, kind="stable")
    ordered = levels[order]
    midpoints = (ordered[:-1] + ordered[1:]) / np.float32(2.0)
    return cls(name, levels, order.astype(np.uint8), midpoints.astype(np.float32))

  def nearest(self, scaled: jax.Array) -> jax.Array:
    """The uint8 code of the nearest level of each float32 value; halfway values take the lower level."""
    midpoints = jnp.asarray(self.midpoints).reshape((1,) * scaled.ndim + (-1,))
    rank = jnp.sum(scaled[..., None] > midpoints, axis=-1, dtype=jnp.int32)
    return jnp.asarray(self.order)[rank]

  def value(self, codes: jax.Array) -> jax.Array:
    """The float32 level of each code."""
    return jnp.asarray(self.levels)[codes.astype(jnp.int32)]


NF4 = Codebook.of("nf4", np.asarray(_NF4, np.float32))
FP4 = Codebook.of("fp4", _fp4_levels())
DYNAMIC = Codebook.of("dynamic", _dynamic_map())
FOUR_BIT = {"nf4": NF4, "fp4": FP4}
