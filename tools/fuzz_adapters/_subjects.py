"""What the campaign mutates and loads: a tiny base, one adapter written both ways, and every load path.

The base is a random tiny Llama saved as a Hugging Face checkpoint (the CLI reads it from disk); the
adapter has non-zero A and B on three kernels with per-module ranks and alphas, written once as a PEFT
directory (``jlora.peft.save_pretrained``) and once as a jlora directory (``jlora.save_adapters``), both
fingerprinted to the base and with their ``SHA256SUMS`` manifest.
"""

import contextlib
import dataclasses
import io
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

import jlora
import jlora.peft
from jlora import cli, models

TOKENS = jnp.zeros((1, 1), jnp.int32)
PEFT, JLORA = "peft", "jlora"


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A load's result, reduced to what a caller gets: the adapter tree (numpy) and the LoraConfig."""

  adapters: dict
  config: jlora.LoraConfig


@dataclasses.dataclass
class Subjects:
  """The base on disk and in memory, the two pristine adapter directories and their reference loads."""

  base_dir: pathlib.Path
  model: object
  params: dict
  lora: jlora.Lora
  target: dict
  pristine: dict[str, pathlib.Path]
  reference: dict[str, Loaded]
  fingerprint: dict[str, str]


def _random_like(tree, seed: int, scale: float) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


def _numpy(tree) -> dict:
  return jax.tree.map(np.asarray, tree)


def build(root: pathlib.Path) -> Subjects:
  """Writes the base and both adapter directories under ``root``; no XLA compilation is needed."""
  config = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
  model = models.LlamaForCausalLM(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"]
  models.save_pretrained(root / "base", model, _random_like(shapes, seed=0, scale=0.1))
  model, params = models.from_pretrained(root / "base")  # exactly what the CLI will load
  lora_config = jlora.LoraConfig(targets=r".*/(q_proj|v_proj|o_proj)/kernel", rank=4, alpha=8.0,
                                 rank_pattern={r".*/v_proj/kernel": 2}, alpha_pattern={r".*/o_proj/kernel": 3.0})
  lora = jlora.Lora(model, lora_config)
  target = jax.eval_shape(lora.init, jax.random.key(1), params, TOKENS)
  adapters = _random_like(target, seed=1, scale=0.05)
  pristine = {PEFT: root / "pristine_peft", JLORA: root / "pristine_jlora"}
  jlora.peft.save_pretrained(pristine[PEFT], adapters, lora_config, model, params=params,
                             base_model_name_or_path="fuzz/base")
  jlora.save_adapters(pristine[JLORA], adapters, lora_config, base_fingerprint=jlora.fingerprint(params),
                      extra={"step": 7})
  fingerprints = {PEFT: jlora.peft.base_fingerprint(model, params), JLORA: jlora.fingerprint(params)}
  subjects = Subjects(root / "base", model, params, lora, target, pristine, {}, fingerprints)
  for kind in (PEFT, JLORA):
    subjects.reference[kind] = load(subjects, kind, pristine[kind])
    for got, want in zip(jax.tree.leaves(subjects.reference[kind].adapters), jax.tree.leaves(adapters)):
      if got.tobytes() != want.tobytes():
        raise AssertionError(f"the pristine {kind} adapter does not load back bitwise")
    if stored_fingerprint(kind, pristine[kind]) != fingerprints[kind]:
      raise AssertionError(f"the pristine {kind} adapter does not store its base fingerprint")
  return subjects


def load(subjects: Subjects, kind: str, directory: pathlib.Path) -> Loaded:
  """The library load path of ``kind`` with the default policy (raises what it raises)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jlora.AdapterNormWarning)  # a warning is not a refusal; values are compared
    if kind == PEFT:
      adapters, config = jlora.peft.from_pretrained(directory, subjects.model, subjects.params)
    else:
      adapters, config = jlora.load_adapters(directory, subjects.target, params=subjects.params, lora=subjects.lora)
  return Loaded(_numpy(adapters), config)


def validate_in_process(subjects: Subjects, directory: pathlib.Path) -> tuple[int, str]:
  """``jlora validate DIR --base BASE`` through ``jlora.cli.main``: (exit status, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    status = cli.main(["validate", str(directory), "--base", str(subjects.base_dir)])
  return status, err.getvalue()


def independent_values(kind: str, directory: pathlib.Path, subjects: Subjects) -> np.ndarray | None:
  """Every adapter value the files hold, decoded without jlora (safetensors / plain orbax), sorted.

  jlora's PEFT import transposes and stacks, so values are compared as a sorted multiset. None when
  the independent reader cannot decode the files at all.
  """
  try:
    if kind == PEFT:
      tensors = safetensors.numpy.load_file(directory / "adapter_model.safetensors")
      leaves = list(tensors.values())
    else:
      with ocp.StandardCheckpointer() as checkpointer:
        leaves = jax.tree.leaves(_numpy(checkpointer.restore(directory.resolve() / "adapters", subjects.target)))
  except Exception:  # noqa: BLE001 - any failure of the reference reader means "undecodable"
    return None
  return np.sort(np.concatenate([np.asarray(leaf, np.float32).reshape(-1) for leaf in leaves]))


def tree_values(tree: dict) -> np.ndarray:
  return np.sort(np.concatenate([np.asarray(leaf, np.float32).reshape(-1) for leaf in jax.tree.leaves(tree)]))


def stored_fingerprint(kind: str, directory: pathlib.Path) -> object:
  """The base fingerprint the files carry, read without jlora (safetensors metadata / plain JSON); None if none."""
  try:
    if kind == PEFT:
      with safetensors.safe_open(directory / "adapter_model.safetensors", "numpy") as f:
        return (f.metadata() or {}).get("jlora_base_fingerprint")
    return json.loads((directory / "jlora_adapter.json").read_text()).get("base_fingerprint")
  except Exception:  # noqa: BLE001 - unreadable files carry nothing
    return None
