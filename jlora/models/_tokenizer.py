"""Checkpoint tokenizers through the ``tokenizers`` package (``tokenizer.json``), as transformers sets them up."""

import json
import os
import pathlib
from typing import Literal

import tokenizers

from jlora.models._errors import CheckpointError
from jlora.models._gguf import is_gguf, open_gguf
from jlora.models._gguf_tokenizer import read_vocabulary, tokenizer_from_vocabulary


def _pad_token(directory: pathlib.Path) -> str | None:
  for file in ("tokenizer_config.json", "special_tokens_map.json"):
    path = directory / file
    if path.exists():
      token = json.loads(path.read_text()).get("pad_token")
      if isinstance(token, dict):  # {"content": "[PAD]", ...}
        token = token.get("content")
      if token:
        return token
  return None


def load_tokenizer(
    path: str | os.PathLike,
    *,
    padding_side: Literal["left", "right"] | None = None,
    pad_token: str | None = None,
    max_length: int | None = None,
) -> tokenizers.Tokenizer:
  """Loads ``tokenizer.json`` of a checkpoint directory, or a GGUF file's vocabulary, as a ``tokenizers.Tokenizer``.

  Like transformers' fast tokenizers, the padding and truncation stored in ``tokenizer.json`` are
  switched off (e.g. MiniLM's file pads everything to 128 tokens); special tokens are still added by
  ``encode`` / ``encode_batch`` through the file's post-processor. Batches are padded to their
  longest member only when ``padding_side`` is given: ``"left"`` for generation with decoders,
  ``"right"`` for encoders.

  Args:
    path: the checkpoint directory (or the ``tokenizer.json`` file itself), or a ``.gguf`` file, whose
      ``tokenizer.ggml.*`` metadata is rebuilt into the pipeline transformers builds for it.
    padding_side: enable padding on this side, or None for no padding.
    pad_token: the padding token; None reads ``pad_token`` from ``tokenizer_config.json`` or
      ``special_tokens_map.json`` (a GGUF file's ``tokenizer.ggml.padding_token_id``).
    max_length: truncate encodings to this many tokens, or None for no truncation.

  Returns:
    The tokenizer; ``enc = tok.encode_batch(texts)`` gives ``enc[i].ids`` and
    ``enc[i].attention_mask``.

  Raises:
    CheckpointError: no ``tokenizer.json``, or padding requested without a known pad token.
  """
  path = pathlib.Path(path)
  if is_gguf(path):
    vocabulary = read_vocabulary(open_gguf(path))
    tokenizer = tokenizer_from_vocabulary(vocabulary)
    default_pad_token = lambda: vocabulary.special_token("pad")  # noqa: E731
  else:
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.exists():
      raise CheckpointError(f"No tokenizer.json in {path} (only fast tokenizers are supported).")
    tokenizer = tokenizers.Tokenizer.from_file(str(file))
    default_pad_token = lambda: _pad_token(file.parent)  # noqa: E731
  tokenizer.no_padding()
  tokenizer.no_truncation()
  if max_length is not None:
    tokenizer.enable_truncation(max_length)
  if padding_side is not None:
    pad_token = pad_token or default_pad_token()
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
    if pad_id is None:
      raise CheckpointError(
          f"Padding needs a pad token, and {path} names none in its vocabulary ({pad_token=}); pass pad_token=..."
      )
    tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token)
  return tokenizer
