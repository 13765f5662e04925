"""Training data: local files to TFDS (array_record), tokenized, packed, deterministic and resumable batches.

Public API (everything else is private):

* Build datasets from local files: ``build_jsonl_instructions`` (prompt/completion or chat
  ``messages``), ``build_jsonl_classification`` (text + label), ``build_text`` (lines, paragraphs or
  documents). Each returns a prepared TFDS builder; bad lines raise ``DataError`` or are skipped and
  counted (``on_bad_example``).
* Read any split, ours or a registered TFDS dataset: ``data_source(builder_or_name, split, data_dir=...)``.
* Render chats: ``ChatTemplate``, ``RoleFormat``, ``default_template``, ``render_chat``; a checkpoint's own
  (Jinja) chat template through ``chat_template_turns``.
* Pack: ``LMExample``, ``pack_lm_examples``.
* Iterate: ``lm_batches`` (packed ``inputs``/``targets``/``loss_mask``/``segment_ids``/``positions``),
  ``classification_batches`` (padded ``input_ids``/``attention_mask``/``label``), both a
  ``BatchIterator`` with ``get_state``/``set_state``, ``skipped`` and ``report()``.
* ``DataError``: the one error type for unusable data.

Example:
  >>> import pathlib, tempfile, tokenizers
  >>> from train import data
  >>> tmp = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (tmp / "train.jsonl").write_text(
  ...     '{"prompt": "say hi", "completion": "hi"}\\n'
  ...     '{"messages": [{"role": "user", "content": "say bye"}, {"role": "assistant", "content": "bye"}]}\\n')
  >>> builder = data.build_jsonl_instructions({"train": tmp / "train.jsonl"}, tmp / "tfds", name="demo")
  >>> source = data.data_source("jlora_jsonl_instructions/demo", "train", data_dir=tmp / "tfds")
  >>> words = ["<pad>", "</s>", "<|user|>", "<|assistant|>", "say", "hi", "bye"]
  >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<pad>"))
  >>> tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  >>> _ = tok.add_special_tokens(words[:4])
  >>> batches = data.lm_batches(source, tok, seq_len=8, batch_size=2, template=data.default_template("</s>"))
  >>> batch = next(batches)
  >>> {name: array.shape for name, array in batch.items()}
  {'inputs': (2, 8), 'targets': (2, 8), 'loss_mask': (2, 8), 'segment_ids': (2, 8), 'positions': (2, 8)}
  >>> state = batches.get_state()   # JSON-serialisable; data.lm_batches(...).set_state(state) resumes
"""

from train.data._builders import build_jsonl_classification, build_jsonl_instructions, build_text
from train.data._encode import chat_template_turns
from train.data._errors import DataError
from train.data._iterator import BatchIterator, classification_batches, lm_batches
from train.data._packing import LMExample, pack_lm_examples
from train.data._source import data_source
from train.data._template import ChatTemplate, RoleFormat, default_template, render_chat

__all__ = [
    "BatchIterator",
    "ChatTemplate",
    "DataError",
    "LMExample",
    "RoleFormat",
    "build_jsonl_classification",
    "build_jsonl_instructions",
    "build_text",
    "chat_template_turns",
    "classification_batches",
    "data_source",
    "default_template",
    "lm_batches",
    "pack_lm_examples",
    "render_chat",
]
