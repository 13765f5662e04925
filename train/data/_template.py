"""Chat templates: how turns become one token sequence, and which tokens are trained.

``tokenizers`` has no Jinja chat templates, so the template is explicit data: per role a prefix, a
suffix, whether the role is trained, and whether its turn ends with the end token. A turn renders as::

    prefix | content | end_token (if end) | suffix

and an example as ``bos_token (if set) | turn | turn | ...``. Only the content and the end token of a
trained role are training targets; prefixes (role headers), suffixes, bos and untrained roles are
context. Pieces are tokenized separately (``add_special_tokens=False``) and concatenated, so the target
boundaries are exact; header tokens such as ``<|user|>`` should be special tokens of the tokenizer.
The end and bos tokens are inserted by id and must be in the vocabulary.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import tokenizers

from train.data._errors import BAD_VALUE, BadExample, DataError
from train.data._packing import LMExample


@dataclasses.dataclass(frozen=True)
class RoleFormat:
  """How a turn of one role renders: ``prefix | content | end_token (if end) | suffix``.

  Attributes:
    prefix: text before the content (a role header), never trained.
    suffix: text after the content (and end token), never trained.
    trained: whether the content and end token are training targets (``loss_mask`` 1).
    end: whether the template's ``end_token`` follows the content.
  """

  prefix: str = ""
  suffix: str = ""
  trained: bool = False
  end: bool = False


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Role formats plus the bos and end tokens (see the module docstring).

  Attributes:
    roles: role name -> ``RoleFormat``. Stored instruction data uses roles ``system``, ``user``,
      ``assistant`` (chat lines), ``prompt``, ``completion`` (prompt/completion lines); text data uses
      ``text``. A role a record uses but the template lacks is a bad example (reason ``bad_value``).
    bos_token: a token put before every example (not trained), or None.
    end_token: the token after the content of roles with ``end=True``, e.g. ``"</s>"``.
  """

  roles: Mapping[str, RoleFormat]
  bos_token: str | None = None
  end_token: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))
    ending = sorted(role for role, fmt in self.roles.items() if fmt.end)
    if ending and self.end_token is None:
      raise ValueError(f"Roles {ending} end with the end token, but end_token is None.")
    if not any(fmt.trained for fmt in self.roles.values()):
      raise ValueError("No role of the template is trained: nothing would be a training target.")


def default_template(end_token: str = "</s>", bos_token: str | None = None) -> ChatTemplate:
  """A Zephyr-style template: ``<|user|>\\n{content}</s>\\n<|assistant|>\\n{content}</s>\\n``.

  ``system``/``user``/``assistant`` turns get headers ``<|role|>\\n``, the end token and a ``\\n`` suffix;
  ``prompt`` and ``completion`` render bare (``{prompt}{completion}</s>``), and ``text`` as ``{text}</s>``.
  ``assistant``, ``completion`` and ``text`` are trained.

  Args:
    end_token: the end-of-turn token, e.g. ``"</s>"`` or ``"<|endoftext|>"``.
    bos_token: a token before every example, or None.

  Returns:
    The template.
  """
  return ChatTemplate(
      roles={
          "system": RoleFormat(prefix="<|system|>\n", suffix="\n", end=True),
          "user": RoleFormat(prefix="<|user|>\n", suffix="\n", end=True),
          "assistant": RoleFormat(prefix="<|assistant|>\n", suffix="\n", trained=True, end=True),
          "prompt": RoleFormat(),
          "completion": RoleFormat(trained=True, end=True),
          "text": RoleFormat(trained=True, end=True),
      },
      bos_token=bos_token,
      end_token=end_token,
  )


def _token_id(tokenizer: tokenizers.Tokenizer, token: str, what: str) -> int:
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise ValueError(f"The template's {what} {token!r} is not in the tokenizer's vocabulary.")
  return token_id


class TokenizedTemplate:
  """A ``ChatTemplate`` bound to a tokenizer: prefixes, suffixes, bos and end token as ids."""

  def __init__(self, template: ChatTemplate, tokenizer: tokenizers.Tokenizer):
    self.template = template
    self.tokenizer = tokenizer
    self.bos_ids = [] if template.bos_token is None else [_token_id(tokenizer, template.bos_token, "bos_token")]
    self.end_ids = [] if template.end_token is None else [_token_id(tokenizer, template.end_token, "end_token")]
    self.prefix_ids = {role: self._ids(fmt.prefix) for role, fmt in template.roles.items()}
    self.suffix_ids = {role: self._ids(fmt.suffix) for role, fmt in template.roles.items()}

  def _ids(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

  def check_roles(self, roles: Sequence[str]) -> BadExample | None:
    """A ``BadExample`` if a role has no format in the template, else None."""
    for role in roles:
      if role not in self.template.roles:
        known = sorted(self.template.roles)
        return BadExample(BAD_VALUE, f"role {role!r} has no format in the template (it has {known})")
    return None

  def assemble(self, turns: Sequence[tuple[str, Sequence[int]]]) -> LMExample:
    """Renders turns whose content is already token ids; the roles must be in the template."""
    ids, trained = [self.bos_ids], [np.zeros(len(self.bos_ids), bool)]
    for role, content_ids in turns:
      fmt = self.template.roles[role]
      body = list(content_ids) + (self.end_ids if fmt.end else [])
      for piece, is_trained in ((self.prefix_ids[role], False), (body, fmt.trained), (self.suffix_ids[role], False)):
        ids.append(piece)
        trained.append(np.full(len(piece), is_trained, bool))
    return LMExample(np.concatenate([np.asarray(p, np.int32) for p in ids]), np.concatenate(trained))


def render_chat(
    turns: Sequence[tuple[str, str]], template: ChatTemplate, tokenizer: tokenizers.Tokenizer
) -> LMExample:
  """Renders and tokenizes one example's turns with a template.

  Args:
    turns: ``(role, content)`` pairs, e.g. ``[("user", "hi"), ("assistant", "hello")]``.
    template: the chat template.
    tokenizer: the tokenizer.

  Returns:
    ``LMExample(ids, trained)``: ``trained[i]`` says whether token ``i`` is a training target.

  Raises:
    DataError: a role the template has no format for.

  Example:
    >>> import tokenizers
    >>> words = ["</s>", "<|user|>", "<|assistant|>", "hi", "hello"]
    >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "</s>"))
    >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    >>> _ = tok.add_special_tokens(words[:3])
    >>> example = render_chat([("user", "hi"), ("assistant", "hello")], default_template("</s>"), tok)
    >>> example.ids.tolist()       # <|user|> hi </s> <|assistant|> hello </s>
    [1, 3, 0, 2, 4, 0]
    >>> example.trained.astype(int).tolist()
    [0, 0, 0, 0, 1, 1]
  """
  bound = TokenizedTemplate(template, tokenizer)
  bad = bound.check_roles([role for role, _ in turns])
  if bad is not None:
    raise DataError(bad.detail, reason=bad.reason)
  contents = tokenizer.encode_batch([content for _, content in turns], add_special_tokens=False)
  return bound.assemble([(role, encoding.ids) for (role, _), encoding in zip(turns, contents)])
