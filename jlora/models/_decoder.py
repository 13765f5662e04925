"""A causal decoder on the transformer core: the body (embeddings, layers, final norm) and the LM head.

Architectures subclass :class:`Decoder` and :class:`CausalLM` with their config type, whose
``transformer`` property gives the :class:`~jlora.models._transformer.TransformerSpec`; the body's
and head's module names come from its :class:`~jlora.models._transformer.LayerNames`.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._attention import attention_mask as make_attention_mask
from jlora.models._kv_cache import default_position_ids, sequence_slots
from jlora.models._rope import inverse_frequencies, rope_angles
from jlora.models._transformer import apply_blocks, dense, embed, norm


class Decoder(nn.Module):
  """The decoder body: token embeddings (plus learned positions or RoPE), the layers, the final norm.

  Returns hidden states ``(B, T, D)``; arguments as :meth:`CausalLM.__call__`.

  Attributes:
    config: an architecture config with a ``transformer`` property.
  """

  config: Any
  partition_rules: ClassVar[tuple]  # the architecture's default sharding rules (jlora.sharding.rules_for)

  def setup(self):
    spec = self.config.transformer
    self.tokens = embed(spec, spec.vocab_size, spec.names.tokens)
    if spec.rope_theta is None:
      self.positions = embed(spec, spec.max_positions, spec.names.positions)
    self.final_norm = norm(spec, spec.names.final_norm)

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    spec = self.config.transformer
    if segment_ids is not None:
      if decode:
        raise ValueError("segment_ids (packed rows) cannot be combined with decode=True.")
      if position_ids is None:
        raise ValueError("segment_ids (packed rows) need explicit position_ids that restart in each segment.")
      if attention_mask is None:
        attention_mask = (segment_ids > 0).astype(jnp.int32)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    slots = sequence_slots(self, attention_mask, decode=decode)
    if position_ids is None:
      position_ids = default_position_ids(slots)
    h_btd = self.tokens(input_ids)
    if spec.embedding_scale is not None:
      h_btd = h_btd * jnp.asarray(spec.embedding_scale, spec.dtype)
    rope = None
    if spec.rope_theta is None:
      h_btd = h_btd + self.positions(position_ids)
    else:
      rope = rope_angles(position_ids, inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling),
                         spec.dtype)
    h_btd = nn.Dropout(spec.embedding_dropout, deterministic=deterministic)(h_btd)
    mask_bts = make_attention_mask(
        slots.key_valid_bs, slots.query_slots_t, causal=True, sliding_window=spec.sliding_window
    )
    if segment_ids is not None:  # packed rows: a token sees only earlier tokens of its own example
      mask_bts &= segment_ids[:, :, None] == segment_ids[:, None, :]
    h_btd = apply_blocks(spec, h_btd, mask_bts, rope, slots, decode=decode, deterministic=deterministic)
    return self.final_norm(h_btd)


class CausalLM(nn.Module):
  """A :class:`Decoder` body and its LM head (a ``lm_head`` projection, or the tied token embedding).

  Attributes:
    config: an architecture config with a ``transformer`` property.
  """

  config: Any
  body_class: ClassVar[type[Decoder]]  # the architecture's Decoder subclass
  partition_rules: ClassVar[tuple]  # the architecture's default sharding rules (jlora.sharding.rules_for)

  def setup(self):
    spec = self.config.transformer
    self.body = self.body_class(self.config, name=spec.names.body)
    if not spec.tie_word_embeddings:
      self.lm_head = dense(spec, spec.vocab_size, False, "lm_head")

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      *,
      decode: bool = False,
      deterministic: bool = True,
  ) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` of token ids ``(B, T)``.

    Args:
      input_ids: int token ids, shape ``(B, T)``.
      attention_mask: 1 for tokens, 0 for padding, shape ``(B, T)``; None means no padding.
      position_ids: int positions ``(B, T)``; None derives them from the mask (and cache).
      segment_ids: for packed rows, ``(B, T)`` example ids (0 = padding): attention stays within an
        example. Needs ``position_ids`` that restart per example; not with ``decode``.
      decode: read and append to the KV cache (needs a ``"cache"`` collection, mutable).
      deterministic: disable dropout; with False a ``"dropout"`` rng is needed.

    Returns:
      Logits of shape ``(B, T, vocab_size)`` in the compute dtype.
    """
    h_btd = self.body(input_ids, attention_mask, position_ids, segment_ids, decode=decode, deterministic=deterministic)
    if self.config.transformer.tie_word_embeddings:
      return self.body.tokens.attend(h_btd)
    return self.lm_head(h_btd)
