"""What the compiled train step needs: XLA's memory plan of the step, next to the frozen base's bytes.

Printed once when the step is compiled and kept in ``WORKDIR/train_step_memory.json``, so a QLoRA run
(``model.quantize``) and a plain LoRA run of the same config can be compared figure by figure.
"""

import json
import os
from typing import Any

import jax

from jlora import quant

_MIB = 2**20


def step_memory(compiled: Any, params: Any) -> dict:
  """The memory figures of a compiled train step over the frozen base ``params``.

  Returns:
    ``{"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"}`` from
    ``compiled.memory_analysis()`` (per device; ``peak = argument + output - alias + temp``, what the step holds
    while it runs, the frozen base among its arguments), or ``{"memory_analysis": None}`` where the backend gives
    none; plus ``base_bytes`` (the frozen base's arrays, all shards), ``quantized_params`` and
    ``bytes_per_quantized_param`` (``jlora.quant.footprint``; NaN without quantized kernels).
  """
  footprint = quant.footprint(params)
  figures: dict[str, Any] = {"base_bytes": footprint.total_bytes, "quantized_params": footprint.quantized_params,
                             "bytes_per_quantized_param": footprint.bytes_per_param}
  stats = compiled.memory_analysis()
  if stats is None:
    figures["memory_analysis"] = None
    return figures
  names = ("argument", "output", "alias", "temp")
  figures.update({f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes")) for name in names})
  figures["peak_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"]
                           + figures["temp_bytes"])
  return figures


def describe(figures: dict) -> str:
  """One line for the log."""
  base = f"frozen base {figures['base_bytes'] / _MIB:.1f} MiB"
  if figures["quantized_params"]:
    base += (f" ({figures['quantized_params']:,} quantized params at {figures['bytes_per_quantized_param']:.3f} "
             "bytes each)")
  if figures.get("memory_analysis", True) is None:
    return f"compiled train step: the backend gives no memory analysis; {base}"
  mib = {k: v / _MIB for k, v in figures.items() if k.endswith("_bytes")}
  return (f"compiled train step: peak {mib['peak_bytes']:.1f} MiB per device = argument {mib['argument_bytes']:.1f} + "
          f"output {mib['output_bytes']:.1f} - alias {mib['alias_bytes']:.1f} + temp {mib['temp_bytes']:.1f}; {base}")


def write(workdir: str, figures: dict) -> None:
  """``WORKDIR/train_step_memory.json`` (process 0 only)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "train_step_memory.json"), "w") as f:
      json.dump(figures, f, indent=2)
      f.write("\n")
