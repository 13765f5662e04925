"""The ``jlora`` command line: inspect, validate, merge and convert LoRA adapters, safely, and chat with one.

    jlora inspect ADAPTER [--base BASE] [--json]
    jlora validate ADAPTER --base BASE [--strict] [--require-manifest] [--allow-missing-fingerprint]
    jlora merge --base BASE --adapter ADAPTER --out OUT [--dtype bfloat16]
    jlora export-peft --base BASE --adapter ADAPTER --out OUT [--base-model-name-or-path ID]
    jlora import-peft --base BASE --adapter PEFT_DIR --out OUT [--allow-missing-fingerprint]
    jlora chat --base BASE [--adapter ADAPTER] [--prompt TEXT] [--system TEXT] [--max-new-tokens N]
               [--temperature T] [--top-k K] [--top-p P] [--raw]

``jlora`` is the console script ``pip install jlora`` installs; ``python -m jlora`` runs the same.

``BASE`` is a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) of a
``jlora.models`` architecture, or a GGUF file (``*.gguf``: llama, qwen2, gemma). ``ADAPTER`` is either a
jlora adapter directory (``jlora.save_adapters``: ``jlora_adapter.json`` + orbax) or a PEFT LoRA directory
(``adapter_config.json`` + ``adapter_model.safetensors``); the kind is detected. Every adapter is loaded
through jlora's safety checks; a refused adapter exits with status 1 and the reason on stderr. An adapter
that stores no base fingerprint is refused unless ``--allow-missing-fingerprint`` is given: adapters
written by Hugging Face PEFT itself store none, so importing one needs the flag.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.peft
from jlora import models
from jlora._chat import TextStream, TokenStreamer
from jlora.models._gguf import hf_config_from_gguf, is_gguf, open_gguf

_SAFETY = """safety checks (all load paths): safetensors/orbax only, never pickle; file, header and JSON size
caps; float16/bfloat16/float32 only; exactly the tensors and shapes the config and base imply; finite
values; the stored base fingerprint against --base (an adapter that stores none is refused unless
--allow-missing-fingerprint: Hugging Face PEFT's own files store none); the SHA256SUMS manifest when
present; per-module update norms ||s*A@B||/||W|| with outliers flagged (a warning, or a refusal with
--strict)."""


def _policy(args) -> jlora.LoadPolicy:
  return jlora.LoadPolicy(strict=getattr(args, "strict", False),
                          require_manifest=getattr(args, "require_manifest", False),
                          allow_missing_fingerprint=getattr(args, "allow_missing_fingerprint", False))


def _kind(adapter: pathlib.Path) -> str:
  if (adapter / "jlora_adapter.json").exists():
    return "jlora"
  if (adapter / "adapter_config.json").exists():
    return "peft"
  raise jlora.UnsafeAdapterError(f"{adapter} is neither a jlora adapter directory (jlora_adapter.json) nor a PEFT "
                                 "adapter directory (adapter_config.json).")


def _flat_paths(tree) -> set[str]:
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _scan_layers_for(base: pathlib.Path, adapter: pathlib.Path, policy: jlora.LoadPolicy) -> bool:
  """The ``scan_layers`` setting whose param paths hold every adapted kernel of a jlora adapter."""
  kernels = {path.rsplit("/", 1)[0] for path in _flat_paths(jlora.adapter_shapes(adapter, policy=policy))}
  config = models.config_from_hf(_hf_config(base))
  for scan in (config.scan_layers, not config.scan_layers):
    model = models.model_for_config(dataclasses.replace(config, scan_layers=scan))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    if kernels <= _flat_paths(shapes):
      return scan
  raise jlora.UnsafeAdapterError(f"The adapter at {adapter} adapts parameters that {base} does not have: "
                                 f"{sorted(kernels)[:4]}...")


def _hf_config(base: pathlib.Path) -> dict:
  """The base's ``config.json`` contents; for a GGUF file, what its metadata stands for."""
  if is_gguf(base):
    return hf_config_from_gguf(open_gguf(base))
  return json.loads((base / "config.json").read_text())


@dataclasses.dataclass
class Loaded:
  kind: str
  model: object
  params: dict
  adapters: dict
  config: jlora.LoraConfig
  lora: jlora.Lora
  metadata: dict


def _load(base: str, adapter: str, policy: jlora.LoadPolicy, **checks) -> Loaded:
  """The base model and the adapter, through the safety checks of the adapter's kind."""
  base_dir, adapter_dir = pathlib.Path(base), pathlib.Path(adapter)
  kind = _kind(adapter_dir)
  tokens = jnp.zeros((1, 1), jnp.int32)
  if kind == "peft":
    model, params = models.from_pretrained(base_dir)
    # Every PEFT type; a VeRA file brings its projections, which join the params (frozen state).
    params, adapters, config = jlora.peft.from_pretrained_with_base(adapter_dir, model, params, policy=policy,
                                                                    **checks)
    lora = jlora.Lora(model, config)
    lora.trace(params, tokens)
    return Loaded(kind, model, params, adapters, config, lora, json.loads((adapter_dir / "adapter_config.json")
                                                                          .read_text()))
  metadata = jlora.load_adapter_metadata(adapter_dir, policy=policy)
  expected = checks.get("expected_fingerprint")
  if expected is not None and metadata["base_fingerprint"] != expected:
    raise jlora.UnsafeAdapterError(f"{adapter_dir} stores base fingerprint {metadata['base_fingerprint']!r}, "
                                   f"expected {expected!r}.")
  expected = checks.get("expected_base_model")
  if expected is not None and metadata["extra"].get("base_model_name_or_path") != expected:
    raise jlora.UnsafeAdapterError(f"{adapter_dir} records base model "
                                   f"{metadata['extra'].get('base_model_name_or_path')!r}, expected {expected!r}.")
  model, params = models.from_pretrained(base_dir, scan_layers=_scan_layers_for(base_dir, adapter_dir, policy))
  lora = jlora.Lora(model, metadata["lora_config"])
  if lora.config.rewrites_base:
    raise jlora.JloraError(
        f"{adapter_dir} is a {lora.config.init} adapter: it belongs to the residual base its init computed, which "
        "is not on disk. Export it for the original base as plain LoRA (jlora.variants.to_plain_lora; the training "
        "job does) and use that.")
  if lora.variant.init_state is not None:  # VeRA: its projections are rebuilt from the config's seed
    params = lora.init_with_base(jax.random.key(0), params, tokens)[0]
  target = jax.eval_shape(lora.init_with_base, jax.random.key(0), params, tokens)[1]
  # The stored fingerprint is checked against these params; the norm report runs with this lora.
  adapters, config = jlora.load_adapters(adapter_dir, target, params=params, lora=lora, policy=policy)
  return Loaded(kind, model, params, adapters, config, lora, metadata)


def _warned(caught: list[warnings.WarningMessage]) -> None:
  for warning in caught:
    print(f"warning: {warning.message}", file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------------


def _inspect(args) -> int:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", jlora.AdapterNormWarning)
    if args.base is None:
      return _inspect_structure(pathlib.Path(args.adapter), args.json)
    loaded = _load(args.base, args.adapter, _policy(args))
  report = jlora.norm_report(loaded.lora, loaded.params, loaded.adapters)
  summary = loaded.lora.summary(loaded.params, loaded.adapters)
  manifest = jlora.verify_manifest(args.adapter)
  dtypes = sorted({np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(loaded.adapters)})
  if args.json:
    print(_json({
        "kind": loaded.kind, "lora_config": loaded.config.to_dict(), "dtypes": dtypes,
        "manifest": sorted(manifest), "trainable": summary.trainable, "total": summary.total,
        "targets": [dataclasses.asdict(row) for row in summary.rows],
        "norms": {"median_ratio": report.median_ratio, "mad_log": report.mad_log,
                  "rows": [dataclasses.asdict(row) for row in report.rows]},
    }))
  else:
    config = loaded.config
    print(f"adapter: {args.adapter} ({loaded.kind}); base: {args.base}")
    print(f"rank {config.rank}, alpha {config.alpha:g}, rslora {config.use_rslora}, dropout {config.dropout:g}, "
          f"dtypes {dtypes}")
    if config.rank_pattern or config.alpha_pattern:
      print(f"rank_pattern {dict(config.rank_pattern)}, alpha_pattern {dict(config.alpha_pattern)}")
    print(f"manifest: {'verified, ' + str(len(manifest)) + ' files' if manifest else 'none'}\n")
    print(summary, end="\n\n")
    print(report)
  _warned(caught)
  return 0


def _inspect_structure(adapter: pathlib.Path, as_json: bool) -> int:
  """Without a base: what the adapter holds, from its metadata and headers (no values read)."""
  kind = _kind(adapter)
  jlora.verify_manifest(adapter)
  if kind == "jlora":
    config = jlora.load_adapter_metadata(adapter)["lora_config"].to_dict()
    leaves = {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in _leaves(jlora.adapter_shapes(adapter))}
  else:
    from jlora._safety import (
      read_safetensors,  # header only: shapes and dtypes, no values
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    header = read_safetensors(adapter / "adapter_model.safetensors", jlora.LoadPolicy(), read_data=False)
    leaves = {name: (entry.shape, entry.dtype) for name, entry in header.entries.items()}
  if as_json:
    print(_json({"kind": kind, "config": config, "tensors": leaves}))
  else:
    print(f"adapter: {adapter} ({kind}); pass --base for targets, parameter counts and the norm report")
    print(json.dumps(config, indent=2, default=str))
    for name, (shape, dtype) in leaves.items():
      print(f"  {name}  {'x'.join(map(str, shape))}  {dtype}")
  return 0


def _json(data) -> str:
  """Strict JSON: infinities (a robust z-score with zero spread) become strings."""

  def clean(value):
    if isinstance(value, float) and not np.isfinite(value):
      return str(value)
    if isinstance(value, dict):
      return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [clean(v) for v in value]
    return value

  return json.dumps(clean(data), indent=2, default=str, allow_nan=False)


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def _validate(args) -> int:
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", jlora.AdapterNormWarning)
    loaded = _load(args.base, args.adapter, _policy(args), expected_fingerprint=args.expected_fingerprint,
                   expected_base_model=args.expected_base_model)
  _warned(caught)
  report = jlora.norm_report(loaded.lora, loaded.params, loaded.adapters)
  print(f"OK: {args.adapter} ({loaded.kind}) fits {args.base}: {len(loaded.lora.targets)} targets, "
        f"{len(report.rows)} modules, median update ratio {report.median_ratio:.3g}, "
        f"{len(report.outliers)} flagged")
  return 0


def _merge(args) -> int:
  loaded = _load(args.base, args.adapter, _policy(args))
  dtype = jnp.dtype(args.dtype) if args.dtype else None
  jlora.peft.save_merged(args.out, loaded.model, loaded.params, loaded.adapters, loaded.config, dtype=dtype)
  print(f"merged {args.adapter} into {args.base}: wrote {args.out}")
  return 0


def _export_peft(args) -> int:
  loaded = _load(args.base, args.adapter, _policy(args))
  written = jlora.peft.save_pretrained(
      args.out, loaded.adapters, loaded.config, loaded.model, params=loaded.params,
      base_model_name_or_path=args.base_model_name_or_path or args.base,
      task_type=None if args.task_type == "none" else args.task_type)
  print(f"wrote PEFT adapter {args.out}: target_modules {written['target_modules']}, r {written['r']}, "
        f"lora_alpha {written['lora_alpha']}")
  return 0


def _import_peft(args) -> int:
  if _kind(pathlib.Path(args.adapter)) != "peft":
    raise jlora.UnsafeAdapterError(f"{args.adapter} is not a PEFT adapter directory (no adapter_config.json).")
  loaded = _load(args.base, args.adapter, _policy(args))
  jlora.save_adapters(args.out, loaded.adapters, loaded.config, base_fingerprint=jlora.fingerprint(loaded.params),
                      extra={"imported_from": os.path.abspath(args.adapter),
                             "base_model_name_or_path": loaded.metadata.get("base_model_name_or_path")})
  print(f"wrote jlora adapter {args.out}: {len(loaded.lora.targets)} targets")
  return 0


def _end_ids(model, tokenizer, template: models.ChatTemplate | None) -> list[int]:
  """The model's end-of-sequence token(s) and the chat template's ``eos_token`` (its end of turn)."""
  eos = model.config.eos_token_id
  ids = list(eos) if isinstance(eos, list | tuple) else [eos]
  if template is not None and template.special_tokens.get("eos_token"):
    ids.append(tokenizer.token_to_id(template.special_tokens["eos_token"]))
  return sorted({i for i in ids if i is not None})


def _chat(args) -> int:
  tokenizer = models.load_tokenizer(args.base)  # first: a base without a tokenizer or template fails fast
  template = None if args.raw else models.load_chat_template(args.base)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", jlora.AdapterNormWarning)
    if args.adapter:
      loaded = _load(args.base, args.adapter, _policy(args))
      model, params, apply_fn = loaded.model, loaded.lora.inject(loaded.params, loaded.adapters), loaded.lora.apply_fn()
    else:
      model, params = models.from_pretrained(args.base)
      apply_fn = model.apply
  _warned(caught)
  streamer = TokenStreamer(model, apply_fn)
  eos_ids, rng = _end_ids(model, tokenizer, template), jax.random.key(args.seed)
  messages = [{"role": "system", "content": args.system}] if args.system else []
  prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
  for prompt in prompts:
    if not prompt.strip():
      continue
    if template is None:
      ids = tokenizer.encode(prompt).ids  # the tokenizer's own special tokens (e.g. BOS), as for plain text
    else:  # the rendered template holds its special tokens already, as transformers' apply_chat_template
      messages.append({"role": "user", "content": prompt})
      ids = tokenizer.encode(models.apply_chat_template(template, messages), add_special_tokens=False).ids
    rng, key = jax.random.split(rng)
    text = TextStream(tokenizer)
    for token in streamer.stream_tokens(params, ids, max_new_tokens=args.max_new_tokens, eos_ids=eos_ids,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, rng=key):
      print(text.push(token), end="", flush=True)
    print(text.flush(), flush=True)
    if template is not None:  # the answer joins the conversation the next prompt continues
      messages.append({"role": "assistant", "content": text.text})
  return 0


# --- argument parsing -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jlora", description=__doc__.split("\n\n")[0] + "\n\n" + _SAFETY,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Exit status: 0 success, 1 adapter refused or unusable (reason on stderr), 2 usage error.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  raw = argparse.RawDescriptionHelpFormatter

  def command(name: str, help_: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help_, description=description + "\n\n" + _SAFETY, formatter_class=raw)

  def base(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--base", required=required, help="Hugging Face checkpoint directory of the base model "
                                                     "(config.json + *.safetensors; llama, mistral, qwen2, gemma, "
                                                     "gpt2 or bert), or a GGUF file (llama, qwen2, gemma).")

  def strictness(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="refuse adapters whose update norms are flagged "
                                                         "(default: warn)")
    p.add_argument("--require-manifest", action="store_true", help="refuse an adapter directory without a "
                                                                   "SHA256SUMS manifest")
    p.add_argument("--allow-missing-fingerprint", action="store_true",
                   help="load an adapter that stores no base fingerprint, so its base cannot be checked "
                        "(LoadPolicy.allow_missing_fingerprint). Hugging Face PEFT's own save_pretrained stores none: "
                        "genuine PEFT adapters need this flag; jlora's writers always store one.")

  p = command("inspect", "show an adapter's targets, ranks, parameter counts, dtypes and update-norm report",
              "Loads the adapter (safely) and prints its LoraConfig, a per-target table (kernel shape, rank, scale, "
              "adapter parameters), the trainable/total parameter count, its dtypes, the manifest status and the "
              "per-module norm report ||s*A@B||_F / ||W||_F with median, robust z-scores and flagged outliers. "
              "Without --base, lists what the files hold (config, tensor names, shapes, dtypes) without reading "
              "values.")
  p.add_argument("adapter", help="jlora adapter directory (jlora.save_adapters) or PEFT adapter directory")
  base(p, required=False)
  strictness(p)
  p.add_argument("--json", action="store_true", help="print machine-readable JSON")
  p.set_defaults(run=_inspect)

  p = command("validate", "check that an adapter is safe to load onto a base; exit 1 with the reason if not",
              "Runs every safety check against the base and prints OK with a one-line summary, or the reason the "
              "adapter is refused (on stderr, exit status 1).")
  p.add_argument("adapter", help="jlora adapter directory or PEFT adapter directory")
  base(p)
  strictness(p)
  p.add_argument("--expected-fingerprint", help="require this stored base fingerprint (jlora.fingerprint for "
                                                "jlora adapters, jlora.peft.base_fingerprint for PEFT files), "
                                                "even with --allow-missing-fingerprint")
  p.add_argument("--expected-base-model", help="require this base_model_name_or_path (PEFT adapters)")
  p.set_defaults(run=_validate)

  p = command("merge", "fold an adapter into its base and write a Hugging Face checkpoint",
              "Computes W' = W + s*A@B in float32 for every adapted kernel (jlora.Lora.merge) and writes config.json "
              "+ model.safetensors (+ SHA256SUMS) that transformers and jlora.models load without any adapter code.")
  base(p)
  p.add_argument("--adapter", required=True, help="jlora or PEFT adapter directory")
  p.add_argument("--out", required=True, help="output directory (must not hold other weights)")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the merged weights (default: "
                                                                               "the base's dtype)")
  strictness(p)
  p.set_defaults(run=_merge)

  p = command("export-peft", "write a jlora adapter as a Hugging Face PEFT adapter directory",
              "Writes adapter_config.json + adapter_model.safetensors (+ SHA256SUMS) exactly as PEFT's "
              "save_pretrained would for the same adapter: per-layer keys (stacked layers unstacked), PyTorch "
              "(out, in) layouts, target_modules/rank_pattern/alpha_pattern that select the same modules with the "
              "same ranks and scales. peft.PeftModel.from_pretrained loads it on the transformers model.")
  base(p)
  p.add_argument("--adapter", required=True, help="jlora adapter directory (or a PEFT one, to re-export it)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--base-model-name-or-path", help="what PEFT records as the base (default: --base)")
  p.add_argument("--task-type", default="auto", help="PEFT task_type (default: CAUSAL_LM for decoders, "
                                                     "FEATURE_EXTRACTION for BERT; 'none' for none)")
  strictness(p)
  p.set_defaults(run=_export_peft)

  p = command("import-peft", "load a PEFT LoRA adapter (safely) and save it as a jlora adapter",
              "Reads a PEFT adapter directory through every safety check (PEFT's own matching rules decide the "
              "adapted modules, ranks and alphas; the file must hold exactly those tensors) and writes it with "
              "jlora.save_adapters (orbax + jlora_adapter.json + SHA256SUMS), fingerprinted to the base. An "
              "adapter written by PEFT itself stores no base fingerprint: pass --allow-missing-fingerprint to "
              "import it.")
  base(p)
  p.add_argument("--adapter", required=True, help="PEFT adapter directory")
  p.add_argument("--out", required=True, help="output directory for the jlora adapter")
  strictness(p)
  p.set_defaults(run=_import_peft)

  p = command("chat", "answer prompts with a base model (GGUF file or HF directory) and an adapter, streaming",
              "Loads the base and, with --adapter, a jlora or PEFT adapter through the safety checks (the adapter "
              "is applied, not merged), renders the prompt with the base's chat template and prints the answer "
              "token by token as it is decoded (KV cache; greedy unless --temperature > 0). The prompt is --prompt, "
              "or else every line of stdin in turn as one conversation (type lines, end with Ctrl-D).")
  base(p)
  p.add_argument("--adapter", help="jlora or PEFT adapter directory (default: the base alone)")
  p.add_argument("--prompt", help="the user's message (default: read lines from stdin)")
  p.add_argument("--system", help="a system message before the conversation")
  p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text to continue")
  p.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens per answer (default 256)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 (default) for greedy decoding, else sampling")
  p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
  p.add_argument("--top-p", type=float, help="sample within the nucleus of this probability mass")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  strictness(p)
  p.set_defaults(run=_chat)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``jlora`` command line; returns the exit status."""
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except jlora.JloraError as e:  # UnsafeAdapterError, CheckpointError and friends: a refusal, not a crash
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
