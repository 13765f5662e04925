"""RMSNorm in the two conventions of Hugging Face checkpoints (Llama and Gemma)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Root-mean-square layer norm: ``y = x / sqrt(mean(x**2) + eps) * w``.

  The normalisation is computed in float32. Llama-style (``zero_centered=False``): the normalised
  input is cast to the compute dtype and multiplied by ``w = scale``. Gemma-style
  (``zero_centered=True``): the scale is stored centred on zero and ``w = 1 + scale`` is applied in
  float32 before the cast, exactly as transformers does for each family.

  Attributes:
    epsilon: added to the mean square.
    zero_centered: Gemma's ``(1 + scale)`` convention.
    dtype: compute (output) dtype.
    param_dtype: dtype of ``scale``.
  """

  epsilon: float = 1e-6
  zero_centered: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    scale = scale.reshape((1,) * (x.ndim - 1) + scale.shape)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    if self.zero_centered:
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * normed.astype(self.dtype)
