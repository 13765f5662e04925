"""How fast and how lean jlora is, as ratios measured side by side in one run (tracker issue 7).

Run ``python -m tools.bench [--suite smoke|quick|full] [--out results.json] [--profile DIR]``. Each run
trains, compiles and serves the same ``jlora.models.LlamaForCausalLM`` shapes with and without LoRA
(and with the nnx and PEFT peers), prints a table and writes JSON with the device, versions and every
figure. ``docs/benchmarks.md`` holds the latest recorded run.

Modules: ``_suites`` (what is measured), ``_run`` (measuring it), ``_models`` (the model and train
steps), ``_nnx_llama`` and ``_peers`` (the comparison contenders), ``_inference`` (forward and decode
contenders), ``_qlora`` and ``_qwix`` (QLoRA against the bf16 base and qwix's QLoRA), ``_timing``
(compile, FLOPs, memory, interleaved wall time), ``_profile`` (per-op time), ``_machine`` (device, versions,
load) and ``_report`` (the JSON and the table).
"""

from tools.bench._report import Report, Result
from tools.bench._run import run_suite
from tools.bench._suites import SUITES, Suite

__all__ = ["SUITES", "Report", "Result", "Suite", "run_suite"]
