"""jlora: LoRA fine-tuning for JAX/Flax, as a transform of parameter trees.

Public API (everything else is private):

* ``LoraConfig``: what to adapt and how (targets by regex over parameter paths, rank, alpha, ...).
* ``Lora``: the transform for an unmodified ``flax.linen`` model: ``init``, ``apply``, ``merge``,
  ``unmerge``, ``summary``, ``apply_fn``.
* ``adapters_only``, ``adapter_labels``, ``lora_plus``: optax routing for adapter leaves.
* ``save_adapters``, ``load_adapters``, ``load_adapter_metadata``, ``fingerprint``: adapter-only orbax
  checkpoints carrying the LoraConfig and a fingerprint of the base model.
* ``Summary``, ``TargetRow``, ``Target``, ``KernelLayout``: the data types.
* ``Variant``, ``Call``, ``STATE_KEY``: the variant interface; ``LORA``, ``DORA``, ``VERA``, ``ADALORA``,
  ``variant_for`` and the ``jlora.variants`` package: the adapter family (LoRA, DoRA, PiSSA/OLoRA inits, VeRA,
  AdaLoRA), selected by ``LoraConfig``.
* ``adalora_allocator``, ``AdaLoraAllocatorState``, ``adalora_orth_loss``, ``adalora_resize``: AdaLoRA's rank
  allocator (optax), orthogonal regulariser, and adapter at its allocated ranks.
* ``JloraError``: the one error type for unusable configs, adapters and models.
* ``UnsafeAdapterError``, ``AdapterNormWarning``, ``LoadPolicy``: the safety checks every adapter load path applies
  (never pickle; size caps; float dtypes; exact keys/shapes; finite; fingerprint; SHA256SUMS manifest).
* ``norm_report``, ``NormReport``, ``NormRow``: per-module ``||s A@B|| / ||W||`` with robust outlier flags.
* ``AdapterBank``, ``BankState``: many adapters of one base in one fixed-shape pytree, applied per row of a batch
  (mixed-adapter batches in training and ``jlora.models.generate(..., adapter_ids=...)``), compiled once.
* ``Router``, ``centroid_router``, ``linear_router``, ``pooled_features``: pick a bank slot per request from the base
  model's pooled hidden states (nearest centroid of a few example prompts, or a trained linear router).
* ``invocation_starts``: where each row's activated-LoRA invocation sequence starts (``LoraConfig.invocation_tokens``).
* ``relora_init``, ``relora_apply``, ``relora_fold``, ``relora_restart``, ``relora_prune``, ``relora_schedule``:
  ReLoRA's merge-and-restart (accumulated float32 update of the targeted kernels, optimizer-state pruning, jagged
  schedule); the training job runs it with ``config.relora``.
* ``combine``: several adapters of one base as one (PEFT's ``add_weighted_adapter``: linear, cat, svd, TIES, DARE).
* ``write_manifest``, ``verify_manifest``, ``adapter_shapes``: manifests and a saved adapter's shapes.
* ``jlora.peft``: Hugging Face PEFT export/import and merged checkpoints for ``jlora.models``.
* ``jlora.sharding``: meshes, partition rules, adapter shardings derived from the base.
* ``jlora.quant``: QLoRA's quantized frozen base (NF4/FP4/int8 blocks, bitsandbytes' layout).
* ``jlora.nnx``: the same for ``flax.nnx`` models (model surgery).
"""

from jlora import quant, sharding, variants  # noqa: E402  (after the names it imports)
from jlora._adalora import AdaLoraAllocatorState, adalora_allocator, adalora_orth_loss, adalora_resize
from jlora._adapter_checkpoint import adapter_shapes, load_adapter_metadata, load_adapters, save_adapters
from jlora._alora import invocation_starts
from jlora._bank import AdapterBank, BankState
from jlora._combine import combine
from jlora._config import LoraConfig
from jlora._errors import JloraError
from jlora._fingerprint import fingerprint
from jlora._layout import KernelLayout
from jlora._lora import Lora
from jlora._optim import adapter_labels, adapters_only, lora_plus
from jlora._relora import relora_apply, relora_fold, relora_init, relora_prune, relora_restart, relora_schedule
from jlora._router import Router, centroid_router, linear_router, pooled_features
from jlora._safety import (
    AdapterNormWarning,
    LoadPolicy,
    NormReport,
    NormRow,
    UnsafeAdapterError,
    norm_report,
    verify_manifest,
    write_manifest,
)
from jlora._summary import Summary, TargetRow
from jlora._targets import Target
from jlora._variant import STATE_KEY, Call, Variant
from jlora.variants import ADALORA, ALORA, DORA, LORA, VERA, variant_for

__all__ = [
    "AdapterBank",
    "BankState",
    "invocation_starts",
    "Router",
    "centroid_router",
    "linear_router",
    "pooled_features",
    "AdaLoraAllocatorState",
    "adalora_allocator",
    "adalora_orth_loss",
    "adalora_resize",
    "AdapterNormWarning",
    "Call",
    "ADALORA",
    "ALORA",
    "DORA",
    "VERA",
    "LORA",
    "LoadPolicy",
    "NormReport",
    "NormRow",
    "STATE_KEY",
    "UnsafeAdapterError",
    "adapter_shapes",
    "combine",
    "norm_report",
    "verify_manifest",
    "write_manifest",
    "JloraError",
    "KernelLayout",
    "Lora",
    "LoraConfig",
    "Summary",
    "Target",
    "TargetRow",
    "Variant",
    "adapter_labels",
    "adapters_only",
    "fingerprint",
    "load_adapter_metadata",
    "load_adapters",
    "lora_plus",
    "relora_apply",
    "relora_fold",
    "relora_init",
    "relora_prune",
    "relora_restart",
    "relora_schedule",
    "quant",
    "save_adapters",
    "sharding",
    "variant_for",
    "variants",
]
