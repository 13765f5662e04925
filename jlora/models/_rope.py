"""Rotary position embeddings (RoPE) in the Hugging Face "rotate half" layout, with llama3 scaling."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1 frequency scaling (``rope_scaling={"rope_type": "llama3", ...}`` in HF configs).

  Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by
  ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor`` are kept, and
  the band in between is interpolated smoothly.

  Attributes:
    factor: stretch of the low frequencies (8 for Llama 3.1).
    low_freq_factor: 1 for Llama 3.1.
    high_freq_factor: 4 for Llama 3.1.
    original_max_position_embeddings: the pre-training context length (8192 for Llama 3.1).
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> np.ndarray:
  """RoPE inverse frequencies ``theta ** (-2i / head_dim)``, optionally llama3-scaled.

  Computed in float32 on the host, as transformers does, so the angles match it bit for bit.

  Args:
    head_dim: the rotated dimension (even).
    theta: the RoPE base (``rope_theta``).
    scaling: llama3 scaling, or None for plain RoPE.

  Returns:
    A float32 array of shape ``(head_dim // 2,)``.

  Example:
    >>> inverse_frequencies(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  old_context = scaling.original_max_position_embeddings
  low_freq_wavelen = old_context / scaling.low_freq_factor
  high_freq_wavelen = old_context / scaling.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq).astype(np.float32)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(
    positions_bt: jax.Array, inv_freq: np.ndarray, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
  """``cos`` and ``sin`` of the rotary angles ``position * inv_freq``, duplicated over both halves.

  Args:
    positions_bt: integer position ids, shape ``(B, T)``.
    inv_freq: inverse frequencies from :func:`inverse_frequencies`, shape ``(H // 2,)``.
    dtype: dtype of the returned tables (the compute dtype; angles are computed in float32).

  Returns:
    ``(cos_bth, sin_bth)``, each of shape ``(B, T, H)``.
  """
  freqs_bth = positions_bt.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
  angles_bth = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
  return jnp.cos(angles_bth).astype(dtype), jnp.sin(angles_bth).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  """Rotates query or key heads: ``x * cos + rotate_half(x) * sin``.

  ``rotate_half`` maps ``[x1, x2]`` (the two halves of the head dimension) to ``[-x2, x1]``, the layout
  of Hugging Face checkpoints (Llama, Mistral, Qwen2, Gemma).

  Args:
    x_btnh: queries or keys, shape ``(B, T, N, H)``.
    cos_bth: from :func:`rope_angles`, shape ``(B, T, H)``.
    sin_bth: from :func:`rope_angles`, shape ``(B, T, H)``.

  Returns:
    The rotated array, shape and dtype of ``x_btnh``.
  """
  half = x_btnh.shape[-1] // 2
  rotated_btnh = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  cos_bt1h, sin_bt1h = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
  return (x_btnh * cos_bt1h + rotated_btnh * sin_bt1h).astype(x_btnh.dtype)
