"""Chat templates: a checkpoint's Jinja template that turns a list of messages into the prompt text.

Rendered the way transformers' ``apply_chat_template`` renders them: a sandboxed, immutable Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` filter that does
not escape HTML, ``raise_exception(message)`` and ``strftime_now(format)``, and the tokenizer's
special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) as variables.
"""

import dataclasses
import datetime
import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from jlora.models._errors import CheckpointError
from jlora.models._gguf import is_gguf, open_gguf
from jlora.models._gguf_tokenizer import read_vocabulary

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template and the special tokens it may refer to.

  Attributes:
    source: the Jinja source.
    special_tokens: ``{"bos_token": "<s>", ...}``; None for tokens the checkpoint does not name.
  """

  source: str
  special_tokens: Mapping[str, str | None] = dataclasses.field(default_factory=dict)


def _token_string(token: Any) -> str | None:
  return token.get("content") if isinstance(token, dict) else token  # {"content": "<s>", ...} in older files


def load_chat_template(path: str | os.PathLike) -> ChatTemplate:
  """The chat template of a GGUF file (``tokenizer.chat_template``) or a Hugging Face checkpoint directory.

  A directory's template is ``chat_template.jinja`` or ``chat_template`` in ``tokenizer_config.json``
  (the ``"default"`` one of a named list); its special tokens come from ``tokenizer_config.json``.

  Raises:
    CheckpointError: the checkpoint has no chat template.
  """
  path = pathlib.Path(path)
  if is_gguf(path):
    vocabulary = read_vocabulary(open_gguf(path))
    source = vocabulary.chat_template
    special = {name: vocabulary.special_token(name.removesuffix("_token")) for name in _SPECIAL}
  else:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
      source = {entry["name"]: entry["template"] for entry in source}.get("default")
    if (path / "chat_template.jinja").exists():
      source = (path / "chat_template.jinja").read_text()
    special = {name: _token_string(config.get(name)) for name in _SPECIAL}
  if not source:
    raise CheckpointError(f"{path} has no chat template.")
  return ChatTemplate(source, special)


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
  return datetime.datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
  """The template compiled once per source: compiling costs milliseconds, rendering microseconds."""
  return _environment().from_string(source)


def apply_chat_template(
    template: ChatTemplate | str | os.PathLike,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
  """Renders ``messages`` with a chat template into the prompt text.

  The text already holds the template's special tokens: encode it without adding more
  (``tokenizer.encode(text, add_special_tokens=False)``), as transformers' ``apply_chat_template``
  does when it tokenizes.

  Args:
    template: a :class:`ChatTemplate`, or a GGUF file / checkpoint directory to load it from.
    messages: ``[{"role": "user", "content": "..."}, ...]``.
    add_generation_prompt: end with the header of an assistant turn, so the model writes the answer.
    **variables: further template variables (e.g. ``tools=[...]``).

  Returns:
    The rendered prompt.

  Raises:
    CheckpointError: no template; or the template refused the messages (its ``raise_exception``).

  Example:
    >>> template = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\\n{% endfor %}"
    ...                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    >>> apply_chat_template(template, [{"role": "user", "content": "Hi"}])
    '<user>Hi\\n<assistant>'
  """
  if not isinstance(template, ChatTemplate):
    template = load_chat_template(template)
  context = {**template.special_tokens, **variables}
  try:
    compiled = _compiled(template.source)
    return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                           **context)
  except jinja2.exceptions.TemplateError as e:
    raise CheckpointError(f"The chat template failed on these messages: {e}") from e
