"""A ``tokenizers.Tokenizer`` rebuilt from the vocabulary a GGUF file carries in its metadata.

A GGUF file has no ``tokenizer.json``: it stores llama.cpp's description of the tokenizer
(``tokenizer.ggml.*``): the model kind (``gpt2`` for byte-level BPE, ``llama`` for SentencePiece-style
BPE with byte fallback), the tokens with their types and scores, the BPE merges, the name of the
pre-tokenizer, the special token ids and whether BOS/EOS are added. This module assembles the
``tokenizers`` pipeline those describe, the one transformers builds for the same file, so token ids
agree with it. Pre-tokenizers that are not listed here raise instead of guessing.
"""

import dataclasses

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from jlora.models._errors import CheckpointError
from jlora.models._gguf import architecture, metadata_value

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)
_SPACE = "\u2581"  # SentencePiece's visible space

# The split regexes of the byte-level vocabularies' own tokenizer.json files, by ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _regex_split(pattern: str):
  return lambda: pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


_BYTE_LEVEL_PRE_TOKENIZERS = {
    None: _gpt2_split,  # files written before llama.cpp recorded a pre-tokenizer
    "default": _gpt2_split,
    "gpt-2": _gpt2_split,
    "gpt2": _gpt2_split,
    # SmolLM's own tokenizer.json splits digits one by one first; transformers' GGUF tokenizer does not,
    # and ids follow transformers. They differ only on non-ASCII numerals ("٣٤"): SmolLM has no
    # tokens of several ASCII digits.
    "smollm": _gpt2_split,
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "llama-v3": _regex_split(_LLAMA3_SPLIT),
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
}


@dataclasses.dataclass(frozen=True)
class GgufVocabulary:
  """The ``tokenizer.ggml.*`` metadata of a GGUF file.

  Attributes:
    architecture: ``general.architecture`` (Gemma's vocabularies differ from Llama's).
    kind: ``tokenizer.ggml.model``: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style).
    pre: ``tokenizer.ggml.pre``, the pre-tokenizer's name, or None.
    tokens: the token strings, by id.
    token_types: llama.cpp's token types, by id (1 normal, 2 unknown, 3 control, 4 user-defined, ...).
    scores: SentencePiece scores, by id (empty when absent).
    merges: BPE merges ``"left right"`` (empty when absent).
    special_ids: ``{"bos": id, "eos": id, "unk": id, "pad": id}`` for those the file names.
    add_bos: whether encoding prepends the BOS token.
    add_eos: whether encoding appends the EOS token.
    chat_template: ``tokenizer.chat_template``, or None.
  """

  architecture: str
  kind: str
  pre: str | None
  tokens: list[str]
  token_types: list[int]
  scores: list[float]
  merges: list[str]
  special_ids: dict[str, int]
  add_bos: bool
  add_eos: bool
  chat_template: str | None

  def special_token(self, name: str) -> str | None:
    """The string of special token ``name`` (``"bos"``, ``"eos"``, ``"unk"``, ``"pad"``), or None."""
    index = self.special_ids.get(name)
    return None if index is None else self.tokens[index]


def read_vocabulary(reader: gguf.GGUFReader) -> GgufVocabulary:
  """The tokenizer metadata of an open GGUF file.

  Raises:
    CheckpointError: the file carries no vocabulary.
  """
  get = lambda key, default=None: metadata_value(reader, f"tokenizer.ggml.{key}", default)  # noqa: E731
  kind = get("model")
  tokens = get("tokens")
  if kind is None or tokens is None:
    raise CheckpointError(f"GGUF file {reader.data.filename} has no tokenizer (tokenizer.ggml.model/tokens).")
  special_ids = {
      name: get(f"{key}_token_id")
      for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
      if get(f"{key}_token_id") is not None
  }
  return GgufVocabulary(
      architecture=architecture(reader),
      kind=kind,
      pre=get("pre"),
      tokens=tokens,
      token_types=get("token_type", [1] * len(tokens)),
      scores=get("scores", []),
      merges=get("merges", []),
      special_ids=special_ids,
      # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
      add_bos=bool(get("add_bos_token", kind == "llama")),
      add_eos=bool(get("add_eos_token", False)),
      chat_template=metadata_value(reader, "tokenizer.chat_template"),
  )


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of the 256 byte values (tokenizers' ByteLevel alphabet)."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
          *range(ord("\u00ae"), ord("\u00ff") + 1)]
  spelling = {b: chr(b) for b in kept}
  shifted = 0
  for b in range(256):
    if b not in spelling:
      spelling[b] = chr(256 + shifted)
      shifted += 1
  return spelling


def _byte_level_model(vocab: GgufVocabulary) -> tuple[models.Model, list[str]]:
  """Byte-level BPE; returns the model and the tokens as spelled in its vocabulary."""
  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  # Tokens written in raw text rather than in the byte alphabet are respelled byte by byte.
  tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in vocab.tokens]
  if not vocab.merges:
    raise CheckpointError("A byte-level (gpt2) GGUF vocabulary needs tokenizer.ggml.merges; the file has none.")
  merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
  bpe = models.BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False)
  return bpe, tokens


def _derived_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
  """SentencePiece BPE merges recovered from its vocabulary: every split of a token into two tokens.

  Merges producing higher-priority tokens come first; ties go to longer left, then right, parts; a
  token's own splits are ordered by the ids of their parts.
  """
  ids = {token: i for i, token in enumerate(tokens)}
  candidates = []
  for token, rank in zip(tokens, priority):
    splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
    splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    candidates += [(left, right, rank) for left, right in splits]
  candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)  # stable: equal keys keep order
  return [(left, right) for left, right, _ in candidates]


def _sentencepiece_model(vocab: GgufVocabulary) -> tuple[models.Model, list[str]]:
  """SentencePiece-style BPE with byte fallback; returns the model and its vocabulary's tokens."""
  tokens = list(vocab.tokens)
  if vocab.architecture == "gemma":
    # Gemma stores its tokens of several spaces as real spaces, while its text has them as "▁".
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    priority = [-float(i) for i in range(len(tokens))]  # Gemma's merges follow token order, not scores
  else:
    if len(vocab.scores) != len(tokens):
      raise CheckpointError("A SentencePiece (llama) GGUF vocabulary needs one tokenizer.ggml.scores per token.")
    priority = [float(s) for s in vocab.scores]
  merges = [tuple(m.split(" ", 1)) for m in vocab.merges] if vocab.merges else _derived_merges(tokens, priority)
  bpe = models.BPE({token: i for i, token in enumerate(tokens)}, merges, unk_token=vocab.special_token("unk"),
                   fuse_unk=True, byte_fallback=True)
  return bpe, tokens


def _post_processor(vocab: GgufVocabulary, tokens: list[str]) -> processors.PostProcessor:
  """Wraps each sequence in the BOS / EOS tokens the file asks for (``add_bos_token``, ``add_eos_token``)."""
  wrap = {}
  for name, add in (("bos", vocab.add_bos), ("eos", vocab.add_eos)):
    if add and name not in vocab.special_ids:
      raise CheckpointError(f"The GGUF vocabulary adds a {name.upper()} token but names none.")
    wrap[name] = tokens[vocab.special_ids[name]] if add else None
  specials = {(wrap[name], vocab.special_ids[name]) for name in wrap if wrap[name] is not None}

  def template(sequence: str, type_id: int) -> list[str]:
    return [f"{t}:{type_id}" for t in (wrap["bos"], f"${sequence}", wrap["eos"]) if t is not None]

  return processors.TemplateProcessing(single=template("A", 0), pair=template("A", 0) + template("B", 1),
                                       special_tokens=sorted(specials))


def tokenizer_from_vocabulary(vocab: GgufVocabulary) -> tokenizers.Tokenizer:
  """Builds the ``tokenizers.Tokenizer`` a GGUF vocabulary describes (no padding, no truncation).

  Byte-level vocabularies (``gpt2``) get the BPE merges of the file, the pre-tokenizer its
  ``tokenizer.ggml.pre`` names and a byte-level decoder; SentencePiece-style ones (``llama``) get
  byte fallback, the ``▁`` space convention, and merges from the file or derived from the token scores.
  Control tokens are special added tokens and user-defined tokens plain added tokens, so neither is
  ever split; BOS/EOS are added as the file's ``add_bos_token`` / ``add_eos_token`` say.

  Raises:
    CheckpointError: an unknown tokenizer kind or pre-tokenizer, or missing merges / scores.
  """
  if vocab.kind == "gpt2":
    if vocab.pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
      raise CheckpointError(f"GGUF pre-tokenizer {vocab.pre!r} is not supported; jlora.models knows "
                            f"{sorted(p for p in _BYTE_LEVEL_PRE_TOKENIZERS if p)}.")
    model, tokens = _byte_level_model(vocab)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = _BYTE_LEVEL_PRE_TOKENIZERS[vocab.pre]()
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = set(_byte_alphabet().values())
    spelled = lambda t: set(t) <= alphabet  # noqa: E731  (a control token in raw text is a mislabel)
  elif vocab.kind == "llama":
    model, tokens = _sentencepiece_model(vocab)
    tokenizer = tokenizers.Tokenizer(model)
    if vocab.architecture == "gemma":  # no prefix space
      tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
      strip = []
    else:
      tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
      strip = [decoders.Strip(content=" ", left=1)]
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *strip])
    spelled = lambda t: True  # noqa: E731
  else:
    raise CheckpointError(f"GGUF tokenizer model {vocab.kind!r} is not supported (only 'gpt2' and 'llama').")
  types = vocab.token_types
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL and spelled(t)])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  tokenizer.post_processor = _post_processor(vocab, tokens)
  return tokenizer

