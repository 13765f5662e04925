"""The LoRA train steps jlora is compared with: flax's ``nnx.LoRALinear``, and Hugging Face PEFT on torch.

Each builder returns a :class:`Contender`: a zero-argument callable that runs one train step (the
same next-token cross-entropy and AdamW update as ``_models``), ready for ``time_interleaved``.

The JAX peers beyond flax: qwix's LoRA (``qwix.LoraProvider`` without quantization) on the same linen
``LlamaForCausalLM``, and lorax (PyPI ``jax-lorax``), which needs an older jax than the benchmark's and so runs
in its own virtualenv as a subprocess (``_lorax_worker.py``) that the interleaved rounds time call by call.

The nnx comparison builds one :class:`NnxLlama` twice: once with ``nnx.LoRALinear`` projections
(flax's LoRA), once with plain ``nnx.Linear`` projections adapted by ``jlora.nnx.apply_lora``. Both are
trained through the same functional step (``nnx.split`` into trainable and frozen state, ``jax.grad``
w.r.t. the trainable state, ``nnx.merge`` inside the jitted function), so the two differ only in how
the LoRA path is computed; the graph-traversal cost of ``nnx.jit`` is kept out of both.
"""

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx, traverse_util

import jlora.nnx
from tools.bench._models import (
  LORA_ALPHA,
  LORA_RANK,
  ONE_ADAPTER_PEFT_TARGET,
  ONE_ADAPTER_TARGET,
  PROJECTIONS,
  LinenSetup,
  Shape,
  copy_tree,
  lora_config,
  lora_train_step,
  next_token_loss,
  optimizer,
)
from tools.bench._nnx_llama import NnxLlama, flax_lora_projection, plain_projection
from tools.bench._qwix import QWIX_MISSING, QwixSetup, available, qwix_train_step
from tools.bench._timing import CompiledStep, Stepper, compile_step


@dataclasses.dataclass(frozen=True)
class Contender:
  """One LoRA train step ready to time.

  Attributes:
    run: runs one step (and returns something to block on, or None when synchronous).
    compiled: the JAX compilation (None for torch).
    detail: what exactly this contender is.
  """

  run: Callable[[], Any]
  compiled: CompiledStep | None
  detail: str


def _nnx_contender(model: nnx.Module, trainable: type, ids: jax.Array, detail: str) -> Contender:
  graphdef, trainable_state, frozen_state = nnx.split(model, trainable, ...)
  tx = optimizer()

  def step(trainable_state, opt_state, frozen_state, ids):
    def loss(state):
      return next_token_loss(nnx.merge(graphdef, state, frozen_state)(ids), ids)

    grads = jax.grad(loss)(trainable_state)
    updates, opt_state = tx.update(grads, opt_state, trainable_state)
    return optax.apply_updates(trainable_state, updates), opt_state

  opt_state = tx.init(trainable_state)
  compiled = compile_step(step, trainable_state, opt_state, frozen_state, ids, donate_argnums=(0, 1))
  return Contender(Stepper(compiled.executable, (trainable_state, opt_state), frozen_state, ids), compiled, detail)


def flax_nnx_lora(shape: Shape, ids: jax.Array) -> Contender:
  """flax's own LoRA: ``NnxLlama`` whose projections are ``nnx.LoRALinear`` (``y = x W + x A B``)."""
  config = shape.llama_config(scan=False)
  model = NnxLlama(config, projection=flax_lora_projection(LORA_RANK), rngs=nnx.Rngs(0))
  return _nnx_contender(model, nnx.LoRAParam, ids,
                        f"flax nnx.LoRALinear rank {LORA_RANK} on NnxLlama ({shape.describe()}), layers unrolled")


def jlora_nnx(shape: Shape, ids: jax.Array) -> Contender:
  """jlora on nnx: ``NnxLlama`` with plain projections adapted in place by ``jlora.nnx.apply_lora``."""
  config = shape.llama_config(scan=False)
  model = NnxLlama(config, projection=plain_projection, rngs=nnx.Rngs(0))
  jlora.nnx.apply_lora(model, lora_config(), rngs=nnx.Rngs(params=1))
  return _nnx_contender(model, jlora.nnx.LoraParam, ids,
                        f"jlora.nnx rank {LORA_RANK} alpha {LORA_ALPHA:g} on NnxLlama ({shape.describe()}), layers "
                        "unrolled")


def jlora_linen_one_adapter(setup: LinenSetup) -> Contender:
  """jlora on the unrolled ``LlamaForCausalLM`` with a single adapter (``ONE_ADAPTER_TARGET``), same rank.

  What is left is the frozen base's forward and input-gradient backward: the all-projections step
  minus this one is the cost of the low-rank paths alone.
  """
  lora = jlora.Lora(setup.model, jlora.LoraConfig(targets=ONE_ADAPTER_TARGET, rank=LORA_RANK, alpha=LORA_ALPHA))
  adapters = lora.init(jax.random.key(2), setup.params, setup.ids)
  tx = optimizer()
  compiled = compile_step(lora_train_step(lora, tx), adapters, tx.init(adapters), setup.params, setup.ids,
                          donate_argnums=(0, 1))
  run = Stepper(compiled.executable, (copy_tree(adapters), tx.init(adapters)), setup.params, setup.ids)
  return Contender(run, compiled, f"jlora.Lora with one adapter ({ONE_ADAPTER_TARGET}) on the unrolled "
                                  "LlamaForCausalLM")


def peft_torch(shape: Shape, threads: int, *, one_adapter: bool = False, use_dora: bool = False) -> Contender | str:
  """Hugging Face PEFT on torch CPU: ``transformers.LlamaForCausalLM`` + ``peft.get_peft_model``.

  Same shapes, same LoRA recipe (rank, alpha, the seven projections, no dropout), same loss and AdamW
  (``torch.optim.AdamW`` on the trainable parameters), ``torch.set_num_threads(threads)``, and
  transformers' default attention implementation (``sdpa``). With ``one_adapter`` only the first
  layer's ``q_proj`` is adapted (see ``jlora_linen_one_adapter``); with ``use_dora`` the adapters are
  PEFT's DoRA (``use_dora=True``).

  Returns:
    The contender, or a string saying why torch/transformers/peft could not be used.
  """
  try:
    import peft
    import torch
    import transformers
  except ImportError as error:
    return f"torch/transformers/peft not importable ({error}); install the test extras to compare with PEFT"
  # transformers' own deprecation notice, raised inside its forward; not about this benchmark.
  warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=shape.vocab,
      hidden_size=shape.hidden,
      intermediate_size=shape.intermediate,
      num_hidden_layers=shape.layers,
      num_attention_heads=shape.heads,
      num_key_value_heads=shape.kv_heads,
      max_position_embeddings=max(2048, shape.seq),
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      use_cache=False,
  )
  model = transformers.LlamaForCausalLM(config)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, use_dora=use_dora,
      target_modules=ONE_ADAPTER_PEFT_TARGET if one_adapter else list(PROJECTIONS)))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  tx = torch.optim.AdamW(trainable, lr=1e-4)
  ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))

  def step() -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    tx.step()
    tx.zero_grad(set_to_none=True)

  attention = getattr(model.config, "_attn_implementation", "default")
  which = f"one adapter ({ONE_ADAPTER_PEFT_TARGET})" if one_adapter else "all seven projections"
  return Contender(step, None, f"PEFT {peft.__version__} {'DoRA' if use_dora else 'LoRA'} rank {LORA_RANK} on {which} of transformers "
                               f"{transformers.__version__} LlamaForCausalLM ({shape.describe()}), torch "
                               f"{torch.__version__} with {threads} threads, attention {attention}")


def qwix_lora(setup: LinenSetup) -> Contender | str:
  """qwix's plain LoRA (``qwix.LoraRule`` without a weight qtype) on ``setup``'s linen model: the same seven
  projections, rank and alpha; ``A``/``B`` (``kernel_lora_a``/``_b``) trained, every other leaf frozen.

  Returns:
    The contender, or why qwix could not be used.
  """
  if not available():
    return QWIX_MISSING
  import qwix

  rule = qwix.LoraRule(module_path=rf".*/({'|'.join(PROJECTIONS)})", rank=LORA_RANK, alpha=LORA_ALPHA)
  model = qwix.apply_lora_to_model(setup.model, qwix.LoraProvider([rule]))
  flat = traverse_util.flatten_dict(jax.jit(lambda key: model.init(key, setup.ids)["params"])(jax.random.key(1)),
                                    sep="/")
  adapters = {k: v for k, v in flat.items() if k.endswith(("_lora_a", "_lora_b"))}
  if len(adapters) != 2 * len(PROJECTIONS) * setup.model.config.num_hidden_layers:
    return f"qwix made {len(adapters)} adapter leaves, not one pair per projection: its rule did not match"
  qwix_setup = QwixSetup(model, adapters, {k: v for k, v in flat.items() if k not in adapters})
  tx = optimizer()
  compiled = compile_step(qwix_train_step(qwix_setup, tx), adapters, tx.init(adapters), qwix_setup.frozen,
                          setup.ids, donate_argnums=(0, 1))
  run = Stepper(compiled.executable, (copy_tree(adapters), tx.init(adapters)), qwix_setup.frozen, setup.ids)
  return Contender(run, compiled, f"qwix {importlib.metadata.version('qwix')} LoRA (LoraProvider, no quantization) "
                                  f"rank {LORA_RANK} alpha {LORA_ALPHA:g} on the same unrolled LlamaForCausalLM")


LORAX_PYTHON = Path(__file__).resolve().parents[2] / ".venv-lorax" / "bin" / "python"
LORAX_SETUP = ("python -m venv .venv-lorax && .venv-lorax/bin/pip install jax-lorax==0.3.1 jax==0.4.35 "
               "jaxlib==0.4.35 plum-dispatch==2.3.2")


class _LoraxWorker:
  """The lorax step in its own process (``_lorax_worker.py``): each call runs one step there and waits for it."""

  def __init__(self, shape: Shape):
    spec = {**dataclasses.asdict(shape), "rank": LORA_RANK, "alpha": LORA_ALPHA}
    self._process = subprocess.Popen([str(LORAX_PYTHON), str(Path(__file__).with_name("_lorax_worker.py")),
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=sys.stderr, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    self.ready = self._process.stdout.readline().strip()
    if not self.ready.startswith("ready"):
      self._process.kill()
      raise RuntimeError(f"the lorax worker did not start (said {self.ready!r}); see its stderr above")

  def __call__(self) -> None:
    self._process.stdin.write("step\n")
    self._process.stdin.flush()
    if self._process.stdout.readline().strip() != "done":
      raise RuntimeError("the lorax worker failed a step; see its stderr above")

  def close(self) -> None:
    if self._process.poll() is None:
      self._process.stdin.write("quit\n")
      self._process.stdin.close()
      self._process.wait(timeout=60)


def lorax_subprocess(shape: Shape) -> tuple[Contender, _LoraxWorker] | str:
  """lorax 0.3.1 (``jax-lorax``) on a plain-JAX Llama of ``shape`` (``_lorax_worker.py``), in ``.venv-lorax``.

  Returns:
    ``(contender, worker)`` (close the worker when done), or why lorax could not be run.
  """
  if not LORAX_PYTHON.exists():
    return f"no lorax virtualenv at {LORAX_PYTHON} (make one: {LORAX_SETUP})"
  try:
    worker = _LoraxWorker(shape)
  except RuntimeError as error:
    return str(error)
  _, compile_s, _, version = worker.ready.split()
  return (Contender(worker, None, f"lorax 0.3.1 (LoraWeight on the seven projections, rank {LORA_RANK}, alpha "
                                  f"{LORA_ALPHA:g}) on a plain-JAX Llama of the same shape, layers unrolled, jax "
                                  f"{version} in .venv-lorax: a subprocess, each call one step there (compiled in "
                                  f"{float(compile_s):.1f} s); its CPU time is the parent's only, not comparable"),
          worker)
