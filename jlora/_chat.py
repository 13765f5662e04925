"""Token-by-token decoding with a KV cache, and text that grows as the tokens come (``jlora chat``).

``stream_tokens`` yields each new token as soon as it is chosen: the prompt fills the cache in one
call, then every step feeds the last token back. Two compiled programs serve a whole conversation:
prompts are left-padded (mask 0, so positions are unchanged) to a multiple of ``bucket`` tokens and the
cache is sized in the same steps, so a new turn recompiles only when the conversation outgrows a bucket.

``TextStream`` turns a growing list of token ids into the text to print next: it decodes the whole
answer so far and emits what was added, holding back text that ends in an incomplete UTF-8 sequence
(a byte-level token may carry half a character) until the next token completes it.
"""

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jlora._errors import JloraError
from jlora.models import init_cache, sample_token

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


def _round_up(n: int, step: int) -> int:
  return -(-n // step) * step


class TokenStreamer:
  """Compiled prefill and one-token steps of a causal LM, reused across calls of ``stream_tokens``.

  Args:
    model: a ``jlora.models`` causal LM.
    apply_fn: ``model.apply`` or a function with its signature (``lora.apply_fn()``).
    bucket: prompt lengths and cache sizes are rounded up to multiples of this.
  """

  def __init__(self, model, apply_fn: Callable[..., Any], *, bucket: int = 64):
    self.model, self.bucket = model, bucket

    def forward(params, cache, ids_bt, mask_bt):
      logits_btv, state = apply_fn({"params": params, "cache": cache}, ids_bt, attention_mask=mask_bt, decode=True,
                                   mutable=["cache"])
      return logits_btv[:, -1].astype(jnp.float32), state["cache"]

    self._forward = jax.jit(forward)
    self._choose: dict[tuple, Callable] = {}

  def _chooser(self, temperature: float, top_k: int | None, top_p: float | None) -> Callable:
    key = (temperature, top_k, top_p)
    if key not in self._choose:
      # A Python 0 selects greedy decoding inside sample_token, so the settings are baked into the program.
      self._choose[key] = jax.jit(lambda logits, rng: sample_token(logits, rng, temperature=temperature, top_k=top_k,
                                                                   top_p=top_p))
    return self._choose[key]

  def stream_tokens(self, params, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_ids: Sequence[int] = (),
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    rng: jax.Array | None = None) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` tokens continuing ``prompt_ids``, stopping after an ``eos_ids`` token.

    Args:
      params: the params tree the apply function expects (``lora.inject(params, adapters)`` for LoRA).
      prompt_ids: the prompt's token ids.
      max_new_tokens: the most tokens to generate.
      eos_ids: tokens that end the answer (yielded, then the stream stops).
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k: sample among the ``k`` most likely tokens only.
      top_p: sample within the nucleus of probability mass ``top_p``.
      rng: PRNG key, required when sampling.

    Raises:
      JloraError: an empty prompt, ``max_new_tokens < 1``, a negative temperature, or sampling without an rng.
    """
    if not prompt_ids:
      raise JloraError("The prompt has no tokens.")
    if max_new_tokens < 1:
      raise JloraError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
      raise JloraError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and rng is None:
      raise JloraError("Sampling (temperature > 0) needs an rng.")
    width = _round_up(len(prompt_ids), self.bucket)
    ids = np.zeros((1, width), np.int32)
    mask = np.zeros((1, width), np.int32)
    ids[0, width - len(prompt_ids):] = prompt_ids
    mask[0, width - len(prompt_ids):] = 1
    cache = init_cache(self.model, 1, _round_up(width + max_new_tokens, self.bucket))
    logits, cache = self._forward(params, cache, ids, mask)
    choose = self._chooser(float(temperature) if temperature > 0 else 0, top_k, top_p)
    rng = jax.random.key(0) if rng is None else rng
    one = np.ones((1, 1), np.int32)
    for _ in range(max_new_tokens):
      rng, key = jax.random.split(rng)
      token = int(choose(logits, key)[0])
      yield token
      if token in eos_ids:
        return
      logits, cache = self._forward(params, cache, np.full((1, 1), token, np.int32), one)


class TextStream:
  """The text of a growing answer, piece by piece: ``push(token)`` returns what to print next.

  Example:
    >>> import tokenizers
    >>> alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())  # one token per byte
    >>> tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    >>> tok.decoder = tokenizers.decoders.ByteLevel()
    >>> stream = TextStream(tok)
    >>> [stream.push(token) for token in tok.encode("né").ids]  # "é" is two bytes: printed once whole
    ['n', '', 'é']
    >>> stream.text
    'né'
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, skip_special_tokens: bool = True):
    self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
    self.ids: list[int] = []
    self.text = ""  # what has been emitted

  def push(self, token: int) -> str:
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
    if text.endswith(_INCOMPLETE) or not text.startswith(self.text):
      return ""  # half a character, or a decoder that rewrote earlier text: wait for more tokens
    piece, self.text = text[len(self.text):], text
    return piece

  def flush(self) -> str:
    """The rest of the text (at the end of the answer, whatever the last tokens decode to)."""
    text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
    piece = text[len(self.text):] if text.startswith(self.text) else text
    self.text = text
    return piece
